"""A local session's own filesystem: a sparse ext4 image mounted at its session directory.

Without one, every session writes to the data dir's filesystem, and one that fills it (a runaway log, a
`dd`) stops every other session, the database and the keys beside them. With ``ORZ_SANDBOX_DISK_SIZE``
the session gets "No space left on device" on its own disk and nothing else notices. The image is
sparse: it takes on the host what the session wrote, up to the size. Mounting needs root.

The image lives outside the session dir (``<data>/session-disks/<id>.img``) and stays mounted while the
session exists, stopped or not: the server reads a stopped session's logs and state from it. A host
reboot unmounts it; ``mount_all`` puts the images back at the server's start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess  # nosec B404  # fixed argv of mkfs/mount/umount, paths we made
from pathlib import Path

from api.instances.providers.base import ProviderFailure

log = logging.getLogger("orz.provider.local")

_TOOL_TIMEOUT_S = 60


class SessionDiskFailure(ProviderFailure):
    """A session's disk image could not be made, mounted or removed."""


def image_path(disks_dir: Path, session_id: str) -> Path:
    return disks_dir / f"{session_id}.img"


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True,  # nosec B603
                              timeout=_TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SessionDiskFailure(f"the session's disk: {argv[0]} failed ({exc})") from None
    if done.returncode != 0:
        raise SessionDiskFailure(f"the session's disk: {Path(argv[0]).name} failed: "
                                 f"{(done.stderr or done.stdout).strip()[-300:]}")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise SessionDiskFailure(f"ORZ_SANDBOX_DISK_SIZE needs {name} (apt-get install "
                                 f"{'e2fsprogs' if name.startswith('mkfs') else 'mount'})")
    return found


def ensure(base: Path, image: Path, size_bytes: int) -> bool:
    """Make the session's image if it has none and mount it at ``base``; False for a session made before
    disks were on (its files already in ``base``), which keeps the data dir's filesystem."""
    if os.path.ismount(base):
        return True
    if not image.exists():
        if base.is_dir() and any(base.iterdir()):
            return False
        image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = image.with_suffix(".part")
        with open(partial, "wb") as handle:
            handle.truncate(size_bytes)
        try:
            # -m 0: no blocks kept back for root (the session is never root); lazy init keeps mkfs quick.
            _run([_tool("mkfs.ext4"), "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                  "-L", "orz-session", str(partial)])
        except SessionDiskFailure:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(image)
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    _run([_tool("mount"), "-o", "loop,nodev,nosuid,noatime", str(image), str(base)])
    base.chmod(0o700)
    with contextlib.suppress(OSError):
        (base / "lost+found").rmdir()  # empty on a new filesystem; nothing of the session's
    return True


def release(base: Path, image: Path) -> None:
    """Unmount the session's disk (lazily if something still holds it) and remove its image."""
    if os.path.ismount(base):
        try:
            _run([_tool("umount"), str(base)])
        except SessionDiskFailure:
            # A process that outlived its session (being killed) still holds a file: detach now, the
            # kernel frees the filesystem when it lets go.
            _run([_tool("umount"), "-l", str(base)])
    image.unlink(missing_ok=True)


def mount_all(sessions_dir: Path, disks_dir: Path) -> None:
    """Mount every session's image that is not mounted (after a reboot), so their files are there again."""
    if not disks_dir.is_dir():
        return
    for image in sorted(disks_dir.glob("*.img")):
        base = sessions_dir / image.stem
        try:
            ensure(base, image, 0)
        except SessionDiskFailure as exc:
            log.error("session %s: %s", image.stem, exc.reason)
