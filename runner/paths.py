"""One view of paths for exec, sftp and scp, as sshd gives it.

An absolute path is the real path (what ``pwd`` prints in an exec), a relative one starts in the
workspace (where an exec starts), and ``~``, ``~/...`` and ``~<session id>`` are the session's home.
The session id is the login name clients use (``ssh <id>@host``), and tools ask the remote shell for
``~<login>`` (Ansible's ``echo ~<user>``): sshd's shell finds it in passwd, a session has no passwd
entry, so an exec command gets that one word replaced by the home before its shell sees it.
SFTP and scp reach only the workspace and the home: anything else is refused, however it is spelled.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import asyncssh

_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+@%-]*")


def expand_login_home(command: str, login: str, home: str) -> str:
    """``command`` with each ``~<login>`` that a shell would tilde-expand (at the start of a word, followed
    by ``/`` or the end of the word) replaced by ``home``.

    The word may sit inside quotes of a nested shell (``sh -c 'echo ~id'``), where no quoting added here
    would be right, so a home with characters a shell treats specially is left alone (and unexpanded).
    """
    if not login or "~" + login not in command or not _PLAIN_PATH.fullmatch(home):
        return command
    pattern = re.compile(r"(?<![^\s\"'`=:(])~" + re.escape(login) + r"(?=[/\s\"'`;&|)]|$)")
    return pattern.sub(lambda _: home, command)


def _roots(paths: Iterable[Path]) -> tuple[bytes, ...]:
    """Each root as given and as resolved (a home under a symlinked /home is reachable both ways)."""
    out: list[bytes] = []
    for path in paths:
        for form in (os.path.normpath(path), os.path.realpath(path)):
            raw = os.fsencode(form)
            if raw not in out:
                out.append(raw)
    return tuple(out)


EXPAND_PATH = b"expand-path@openssh.com"


class _ExpandingHandler(asyncssh.sftp.SFTPServerHandler):
    """asyncssh's SFTP request handler plus OpenSSH's expand-path extension.

    OpenSSH's scp (in its default SFTP mode) sends a ``~user/...`` path to the server to expand and, when the
    server lacks the extension, refuses it outright ("server expand-path extension is required"), so
    ``scp f <id>@gateway:~<id>/x`` failed although ``~<id>`` is the session's home everywhere else.
    """

    _extensions = [*asyncssh.sftp.SFTPServerHandler._extensions, (EXPAND_PATH, b"1")]

    async def _process_expand_path(self, packet: asyncssh.packet.SSHPacket) -> tuple[list[asyncssh.SFTPName], bool]:
        path = packet.get_string()
        packet.check_end()
        server = self._server
        if not isinstance(server, SessionSFTP):
            raise asyncssh.SFTPOpUnsupported("expand-path is served for session channels only")
        # The same expansion and the same fence as every other request (map_path): ~, ~<login>, relative.
        return [asyncssh.SFTPName(server.map_path(path))], False

    _packet_handlers = {**asyncssh.sftp.SFTPServerHandler._packet_handlers, EXPAND_PATH: _process_expand_path}
    _return_types = {**asyncssh.sftp.SFTPServerHandler._return_types, EXPAND_PATH: asyncssh.sftp.FXP_NAME}


def serve_expand_path() -> None:
    """Make asyncssh's SFTP servers in this process answer expand-path (it builds its handler by this name;
    there is no hook for extensions). Only the runner's session channels run SFTP servers here."""
    asyncssh.sftp.SFTPServerHandler = _ExpandingHandler  # type: ignore[misc]


class SessionSFTP(asyncssh.SFTPServer):
    """The SFTP server (and asyncssh's scp server, which runs on it) for one session channel."""

    def __init__(self, chan: asyncssh.SSHServerChannel, *, cwd: Path, home: Path, login: str) -> None:
        super().__init__(chan)
        self._cwd = os.fsencode(os.path.realpath(cwd))
        self._home = os.fsencode(os.path.realpath(home))
        self._login = login.encode()
        self._roots = _roots((cwd, home))

    def expand(self, path: bytes) -> bytes:
        """The absolute, normalized path ``path`` names (no file system access, no symlinks followed)."""
        if path.startswith(b"~"):
            head, sep, rest = path[1:].partition(b"/")
            if head in (b"", self._login):
                path = self._home + sep + rest
        full = posixpath.normpath(posixpath.join(self._cwd, path))
        return b"/" + full.lstrip(b"/")  # normpath keeps a leading "//"

    def allowed(self, full: bytes) -> bool:
        return any(full == root or full.startswith(root.rstrip(b"/") + b"/") for root in self._roots)

    def map_path(self, path: bytes) -> bytes:
        full = self.expand(path)
        if not self.allowed(full):
            raise asyncssh.SFTPPermissionDenied(
                f"{os.fsdecode(full)}: outside the session's workspace and home")
        return full

    def reverse_map_path(self, path: bytes) -> bytes:
        return path

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """The entries with ``.`` and ``..`` first, as sftp-server lists them. The ``..`` of the workspace or
        the home lies outside both (asyncssh's own listing would then fail whole, so ``ls`` of either did);
        it is listed as the directory itself, as ``..`` of a chroot's root is."""
        full = self.map_path(path)
        parent = posixpath.dirname(full)
        for name, target in ((b".", full), (b"..", parent if self.allowed(parent) else full)):
            yield asyncssh.SFTPName(name, attrs=asyncssh.SFTPAttrs.from_local(os.lstat(target)))
        with os.scandir(full) as entries:
            for entry in entries:
                attrs = asyncssh.SFTPAttrs.from_local(entry.stat(follow_symlinks=False))
                yield asyncssh.SFTPName(entry.name, attrs=attrs)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # The target is stored as the client wrote it, as sshd does; only where the link goes is checked.
        os.symlink(os.fsdecode(oldpath), os.fsdecode(self.map_path(newpath)))

    def exit(self) -> None:
        # OpenSSH's scp (sftp mode) treats a channel closed without exit-status as a failure.
        with contextlib.suppress(Exception):
            self.channel.exit(0)
