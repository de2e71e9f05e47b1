"""Container images as the process kubelet runs them: our two images from their Dockerfiles, postgres locally.

For our images the configuration (ENTRYPOINT, CMD, ENV, WORKDIR, USER) is read from docker/*.Dockerfile,
so the rehearsal runs what the image would; the image's installed program (/opt/orz) is this checkout's
virtualenv, bound read-only at the same path. What the Dockerfiles' RUN lines make (users, directories)
is listed in ``_IMAGE_FILES`` and checked against the Dockerfile text by the tests. Images that are not
ours run from local binaries where this machine has them (postgres), else they are reported as skipped.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


class ImageNotRunnable(Exception):
    """This machine cannot run the image; the reason is what the rehearsal reports as skipped."""


@dataclass
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    uid: int = 0
    gid: int = 0
    # (name, uid, gid, home) added to the container's /etc/passwd and /etc/group.
    users: list[tuple[str, int, int, str]] = field(default_factory=list)
    # (path, uid, gid, mode) created in the container's root filesystem.
    dirs: list[tuple[str, int, int, int]] = field(default_factory=list)
    # (host path, container path) bound read-only.
    binds: list[tuple[str, str]] = field(default_factory=list)


# What each Dockerfile's RUN lines create; tests/rehearsal checks these names appear in the Dockerfile.
_IMAGE_FILES: dict[str, tuple[list[tuple[str, int, int, str]], list[tuple[str, int, int, int]]]] = {
    "api.Dockerfile": ([("orz", 10001, 10001, "/var/lib/orz")], [("/var/lib/orz", 10001, 10001, 0o755)]),
    "runner.Dockerfile": ([("orzbob", 1000, 1000, "/home/orzbob")],
                          [("/home/orzbob", 1000, 1000, 0o755), ("/workspace", 1000, 1000, 0o755),
                           ("/run/orz", 1000, 1000, 0o755)]),
}


def _code_binds() -> list[tuple[str, str]]:
    """This checkout, its virtualenv and its interpreter at their own paths: the virtualenv's scripts name
    its interpreter by absolute path, and a container's private /tmp and /run would hide a checkout there."""
    paths = [ROOT, VENV, Path(sys.base_prefix)]
    kept: list[Path] = []
    for path in paths:
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path.resolve())
    return [(str(p), str(p)) for p in kept]


def _final_stage(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) of the last stage, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        instruction, _, argument = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), argument.strip()))
    return stages[-1]


def _words(argument: str) -> list[str]:
    return list(json.loads(argument)) if argument.startswith("[") else ["/bin/sh", "-c", argument]


def _env_pairs(argument: str, env: dict[str, str]) -> None:
    for token in shlex.split(argument):
        key, _, value = token.partition("=")
        env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def from_dockerfile(path: Path) -> ImageConfig:
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    config = ImageConfig(entrypoint=[], cmd=[])
    for instruction, argument in _final_stage(path.read_text()):
        if instruction == "ENV":
            _env_pairs(argument, env)
        elif instruction == "WORKDIR":
            config.workdir = argument
        elif instruction == "USER":
            uid, _, gid = argument.partition(":")
            config.uid, config.gid = int(uid), int(gid or uid)
        elif instruction == "ENTRYPOINT":
            config.entrypoint = _words(argument)
        elif instruction == "CMD":
            config.cmd = _words(argument)
    # This checkout's code, whichever checkout the virtualenv was installed from (a worktree may share
    # another's virtualenv, whose editable install would otherwise run that checkout's code in the Pods).
    env["PYTHONPATH"] = str(ROOT)
    config.env = env
    users, dirs = _IMAGE_FILES[path.name]
    config.users, config.dirs = list(users), list(dirs)
    config.binds = [(str(VENV), "/opt/orz"), *_code_binds()]
    return config


def postgres_config() -> ImageConfig:
    """The official postgres image's behaviour from Debian's binaries (rehearsal/postgres_entrypoint.py)."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not binaries:
        raise ImageNotRunnable("no local PostgreSQL server binaries (/usr/lib/postgresql/*/bin/postgres)")
    bindir = binaries[-1].parent
    return ImageConfig(
        entrypoint=[sys.executable, "-m", "rehearsal.postgres_entrypoint"], cmd=["postgres"],
        env={"PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "PGDATA": "/var/lib/postgresql/data", "PYTHONPATH": str(ROOT)},
        users=[("postgres", 70, 70, "/var/lib/postgresql")],
        dirs=[("/var/lib/postgresql", 70, 70, 0o755), ("/var/run/postgresql", 70, 70, 0o2777)],
        binds=_code_binds())


# Tags of our images that run other code than this checkout: tag -> a source tree (e.g. the next
# release, made by rehearsal/versions.py). Its packages shadow the virtualenv's through PYTHONPATH.
CODE_BY_TAG: dict[str, Path] = {}
CODE_MOUNT = "/opt/orz-code"


def resolve(image: str) -> ImageConfig:
    """The configuration to run `image` with, or ImageNotRunnable."""
    repository = image.rsplit("@", 1)[0]
    tag = ""
    if ":" in repository.rsplit("/", 1)[-1]:
        repository, tag = repository.rsplit(":", 1)
    name = repository.rsplit("/", 1)[-1]
    if name in ("orzbob-cloud-runner", "orzbob-cloud") and tag in CODE_BY_TAG:
        config = resolve(repository)
        config.binds.append((str(CODE_BY_TAG[tag]), CODE_MOUNT))
        config.env["PYTHONPATH"] = CODE_MOUNT
        return config
    if name == "orzbob-cloud-runner":
        return from_dockerfile(ROOT / "docker" / "runner.Dockerfile")
    if name == "orzbob-cloud":
        return from_dockerfile(ROOT / "docker" / "api.Dockerfile")
    if name == "postgres":
        return postgres_config()
    raise ImageNotRunnable(f"{image} is not one of ours and this machine has no local stand-in for it")


def have_tini_stand_in(argv: list[str]) -> bool:
    """The runner image starts under tini; the container init plays tini when the binary is absent."""
    return bool(argv) and Path(argv[0]).name == "tini" and shutil.which("tini") is None
