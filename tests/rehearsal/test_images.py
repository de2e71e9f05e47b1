"""The rehearsal runs our images as their Dockerfiles build them (rehearsal/images.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rehearsal import images

DOCKER = Path(images.ROOT) / "docker"


def run_lines(dockerfile: str) -> str:
    """The final stage's RUN instructions, joined (what creates users and directories in the image)."""
    return "\n".join(argument for instruction, argument in images._final_stage((DOCKER / dockerfile).read_text())
                     if instruction == "RUN")


def test_every_dockerfile_is_described() -> None:
    assert {p.name for p in DOCKER.glob("*.Dockerfile")} == set(images._IMAGE_FILES)


@pytest.mark.parametrize("dockerfile", sorted(images._IMAGE_FILES))
def test_the_users_are_the_ones_the_run_lines_add(dockerfile: str) -> None:
    run = run_lines(dockerfile)
    users, _ = images._IMAGE_FILES[dockerfile]
    for name, uid, gid, home in users:
        useradd = re.search(rf"useradd [^&]*--uid {uid} [^&]*\b{name}\b", run)
        assert useradd, f"{dockerfile}: no useradd of {name} with uid {uid}"
        assert f"--home-dir {home}" in useradd.group(0)
        assert re.search(rf"groupadd [^&]*--gid {gid} {name}\b", run), f"{dockerfile}: no group {name} ({gid})"


@pytest.mark.parametrize("dockerfile", sorted(images._IMAGE_FILES))
def test_the_dirs_are_the_ones_the_run_lines_make(dockerfile: str) -> None:
    run = run_lines(dockerfile)
    users, dirs = images._IMAGE_FILES[dockerfile]
    owners = {uid: name for name, uid, _, _ in users}
    for path, uid, _gid, mode in dirs:
        assert mode == 0o755  # install -d and useradd --create-home both make 0755 directories
        owner = owners[uid]
        made = re.search(rf"install -d -o {owner} -g {owner} [^&]*{re.escape(path)}(\s|$)", run)
        home = any(h == path for _, _, _, h in users) and "--create-home" in run
        assert made or home, f"{dockerfile}: nothing makes {path} owned by {owner}"


def test_the_api_image_config_is_the_dockerfiles() -> None:
    config = images.from_dockerfile(DOCKER / "api.Dockerfile")
    assert config.entrypoint == ["orz"] and config.cmd == ["api"]
    assert (config.uid, config.gid) == (10001, 10001)
    assert config.workdir == "/var/lib/orz"
    # ENV of the final stage only (PIP_* belong to the build stage), with $PATH expanded.
    assert config.env["PATH"].startswith("/opt/orz/bin:/usr/local/sbin:")
    assert config.env["ORZ_DATA_DIR"] == "/var/lib/orz" and config.env["PYTHONUNBUFFERED"] == "1"
    assert "PIP_NO_CACHE_DIR" not in config.env
    # The image's program is this checkout's virtualenv; the checkout and its interpreter stay at their own
    # paths, since the virtualenv's scripts name the interpreter by absolute path.
    assert config.binds[0] == (str(images.VENV), "/opt/orz")
    bound = {source for source, target in config.binds[1:] if source == target}
    assert str(images.ROOT) in bound and str(Path(sys.base_prefix).resolve()) in bound


def test_the_runner_image_config_is_the_dockerfiles() -> None:
    config = images.from_dockerfile(DOCKER / "runner.Dockerfile")
    assert config.entrypoint == ["tini", "--", "orz", "runner"] and config.cmd == []
    assert (config.uid, config.gid) == (1000, 1000)
    assert config.workdir == "/workspace"
    assert config.env["PATH"].startswith("/opt/orz/bin:/home/orzbob/.local/bin:/usr/local/sbin:")
    assert config.env["HOME"] == "/home/orzbob" and config.env["LANG"] == "en_US.UTF-8"
    assert config.env["NPM_CONFIG_PREFIX"] == "/home/orzbob/.local"


def test_a_shell_form_cmd_runs_under_sh_and_user_without_group(tmp_path: Path) -> None:
    dockerfile = tmp_path / "api.Dockerfile"  # named as ours so its users and dirs are known
    dockerfile.write_text("FROM a AS build\nCMD [\"no\"]\nFROM b\nENV A=1 B=${A}2\nUSER 42\nCMD echo hi\n")
    config = images.from_dockerfile(dockerfile)
    assert config.cmd == ["/bin/sh", "-c", "echo hi"] and config.entrypoint == []
    assert (config.uid, config.gid) == (42, 42)
    assert config.env["B"] == "12"


@pytest.mark.parametrize(("image", "dockerfile"), [
    ("ghcr.io/orzbob/orzbob-cloud:1.2.3", "api.Dockerfile"),
    ("ghcr.io/orzbob/orzbob-cloud-runner@sha256:" + "0" * 64, "runner.Dockerfile"),
    ("localhost:5000/orzbob-cloud-runner:dev", "runner.Dockerfile"),
])
def test_resolve_picks_the_image_by_repository_name(image: str, dockerfile: str) -> None:
    assert images.resolve(image) == images.from_dockerfile(DOCKER / dockerfile)


def test_an_image_not_ours_is_not_runnable() -> None:
    with pytest.raises(images.ImageNotRunnable, match="not one of ours"):
        images.resolve("docker.io/library/redis:7")


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "runner.Dockerfile"])
def test_our_images_run_this_checkouts_code_whatever_the_virtualenv_was_installed_from(
        dockerfile: str, tmp_path: Path) -> None:
    """A worktree sharing another checkout's virtualenv must not rehearse that checkout's code: the image's
    interpreter, with the image's environment, imports `api` from this checkout."""
    config = images.from_dockerfile(DOCKER / dockerfile)
    shown = subprocess.run([sys.executable, "-c", "import api; print(api.__file__)"], env=config.env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(shown).resolve().is_relative_to(images.ROOT), shown
