"""Inside a new mount and PID namespace (and the Pod's network namespace): build the container, then run it.

The kubelet starts ``nsenter --net=<pod's namespace> unshare --mount --pid --fork --kill-child python -m
rehearsal.container_init <config.json>``. This builds the container's root filesystem as an overlay over the
host's root (so the image's directories and users can be added without touching the host), with a fresh
/proc, /tmp and /run, every volume at its mountPath with its readOnly flag, the Pod's /etc/hosts, and the
root made read-only when ``readOnlyRootFilesystem`` says so; then it changes root, takes the Pod's user,
group and fsGroup, sets no_new_privs, and executes the container's command as PID 1 of its namespace (as a
container runtime does: without a SIGTERM handler, PID 1 ignores SIGTERM). For images that start under
tini it plays tini: it stays PID 1, forwards signals and reaps.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PR_SET_NO_NEW_PRIVS = 38


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True)


def inside(root: Path, path: str) -> Path:
    """`path` as the container sees it: symlinks (absolute ones too, like /var/run -> /run) resolved
    within `root`, never through the host's root."""
    parts = [p for p in path.split("/") if p]
    resolved = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved.parent if resolved != root else root
            continue
        candidate = resolved / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks in {path}")
            link = os.readlink(candidate)
            parts = [p for p in link.split("/") if p] + parts
            if link.startswith("/"):
                resolved = root
            continue
        resolved = candidate
    return resolved


def mount_bind(source: str, target: Path, readonly: bool) -> None:
    if Path(source).is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(exist_ok=True)
    sh("mount", "--bind", source, str(target))
    if readonly:
        sh("mount", "-o", "remount,bind,ro", str(target))


def add_users(root: Path, users: list[list[Any]]) -> None:
    passwd, group = root / "etc" / "passwd", root / "etc" / "group"
    known = passwd.read_text()
    with passwd.open("a") as p, group.open("a") as g:
        for name, uid, gid, home in users:
            if f":{uid}:" not in known:
                p.write(f"{name}:x:{uid}:{gid}::{home}:/bin/sh\n")
                g.write(f"{name}:x:{gid}:\n")


def build_root(config: dict[str, Any]) -> Path:
    base = Path(config["base"])
    sh("mount", "--make-rprivate", "/")
    base.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(base))
    for sub in ("upper", "work", "root"):
        (base / sub).mkdir()
    root = base / "root"
    sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={base}/upper,workdir={base}/work",
       str(root))
    sh("mount", "-t", "proc", "proc", str(root / "proc"))
    sh("mount", "--rbind", "/dev", str(root / "dev"))
    sh("mount", "--rbind", "/sys", str(root / "sys"))
    # A container starts with an empty /tmp and /run, and sees nothing of the other pods' files.
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", str(root / "tmp"))
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root / "run"))
    # The interpreter of this checkout's virtualenv lives under /root (0700 on the host); let the
    # container's users reach it, in the container's view only.
    (root / "root").chmod(0o711)
    add_users(root, config["users"])
    for path, uid, gid, mode in config["dirs"]:
        target = inside(root, path)
        target.mkdir(parents=True, exist_ok=True)
        os.chown(target, uid, gid)
        target.chmod(mode)
    for mount in config["mounts"]:
        mount_bind(mount["source"], inside(root, mount["target"]), bool(mount["readonly"]))
    # The image's program last: a volume at /tmp (the chart's scratch space) must not hide a checkout there.
    for source, target in config["binds"]:
        mount_bind(source, inside(root, target), readonly=True)
    mount_bind(config["hosts"], inside(root, "/etc/hosts"), readonly=True)
    mount_bind(config["resolv"], inside(root, "/etc/resolv.conf"), readonly=True)
    if config["readonly_root"]:
        sh("mount", "-o", "remount,bind,ro", str(root))
    return root


def play_tini(argv: list[str], env: dict[str, str]) -> None:
    """PID 1 that forwards signals to its one child and reaps every orphan (tini's job)."""
    child = os.fork()
    if child == 0:
        os.execvpe(argv[0], argv, env)  # noqa: S606  # nosec B606  # the container's command, an argv list
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda s, _f: os.kill(child, s))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            sys.exit(0)
        except InterruptedError:
            continue
        if pid == child:
            sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    root = build_root(config)
    os.chroot(root)
    os.chdir(config["workdir"] or "/")
    if config["uid"] != 0 or config["gid"] != 0:
        os.setgroups(config["groups"])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
    if config["no_new_privs"]:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    argv, env = config["argv"], config["env"]
    if config["tini"]:
        play_tini(argv[argv.index("--") + 1:] if "--" in argv else argv[1:], env)
    try:
        os.execvpe(argv[0], argv, env)  # noqa: S606  # nosec B606  # the container's command, an argv list
    except OSError as exc:
        print(f"container init: cannot run {argv[0]}: {exc}", file=sys.stderr, flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main()
