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
import grp
import os
import posixpath
import pwd
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import asyncssh
from asyncssh.packet import String

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
USERS_GROUPS_BY_ID = b"users-groups-by-id@openssh.com"


def _user_name(uid: int) -> str:
    """The passwd name of ``uid``, or "" where there is none (sftp then shows the number)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return ""


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return ""


class _NamesReply:
    """The reply to users-groups-by-id: a string of names per uid, then one per gid ("" for unknown)."""

    def __init__(self, users: list[str], groups: list[str]) -> None:
        self.users, self.groups = users, groups

    def encode(self, _version: int) -> bytes:
        def names(items: list[str]) -> bytes:
            return String(b"".join(String(item.encode()) for item in items))

        return names(self.users) + names(self.groups)

    def __str__(self) -> str:  # asyncssh logs what it sends
        return f"users {self.users}, groups {self.groups}"


def _ids(blob: bytes) -> list[int]:
    if len(blob) % 4:
        raise asyncssh.sftp.SFTPBadMessage("id list is not a whole number of uint32s")
    return [int.from_bytes(blob[i:i + 4], "big") for i in range(0, len(blob), 4)]


class _SessionHandler(asyncssh.sftp.SFTPServerHandler):
    """asyncssh's SFTP request handler plus two of OpenSSH's sftp-server extensions.

    expand-path: OpenSSH's scp (in its default SFTP mode) sends a ``~user/...`` path to the server to expand
    and, when the server lacks the extension, refuses it outright ("server expand-path extension is
    required"), so ``scp f <id>@gateway:~<id>/x`` failed although ``~<id>`` is the session's home everywhere
    else.

    users-groups-by-id: OpenSSH's sftp renders ``ls -l`` of single files (and, against a server with this
    extension, of directories) itself from the attributes, which carry only numbers; it asks the server for
    the names, and without the extension showed ``200000 200000`` where sftp-server shows ``orz orz``.
    """

    _extensions = [*asyncssh.sftp.SFTPServerHandler._extensions, (EXPAND_PATH, b"1"), (USERS_GROUPS_BY_ID, b"1")]

    async def _process_expand_path(self, packet: asyncssh.packet.SSHPacket) -> tuple[list[asyncssh.SFTPName], bool]:
        path = packet.get_string()
        packet.check_end()
        server = self._server
        if not isinstance(server, SessionSFTP):
            raise asyncssh.SFTPOpUnsupported("expand-path is served for session channels only")
        # The same expansion and the same fence as every other request (map_path): ~, ~<login>, relative.
        return [asyncssh.SFTPName(server.map_path(path))], False

    async def _process_users_groups_by_id(self, packet: asyncssh.packet.SSHPacket) -> _NamesReply:
        uids, gids = _ids(packet.get_string()), _ids(packet.get_string())
        packet.check_end()
        return _NamesReply([_user_name(uid) for uid in uids], [_group_name(gid) for gid in gids])

    _packet_handlers = {**asyncssh.sftp.SFTPServerHandler._packet_handlers, EXPAND_PATH: _process_expand_path,
                        USERS_GROUPS_BY_ID: _process_users_groups_by_id}
    _return_types = {**asyncssh.sftp.SFTPServerHandler._return_types, EXPAND_PATH: asyncssh.sftp.FXP_NAME,
                     USERS_GROUPS_BY_ID: asyncssh.sftp.FXP_EXTENDED_REPLY}


def serve_openssh_extensions() -> None:
    """Make asyncssh's SFTP servers in this process answer expand-path and users-groups-by-id (it builds its
    handler by this name; there is no hook for extensions). Only the runner's session channels run SFTP
    servers here."""
    asyncssh.sftp.SFTPServerHandler = _SessionHandler  # type: ignore[misc]


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
