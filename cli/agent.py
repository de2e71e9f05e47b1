"""`orz cloud agent`: an ssh-agent (SSH_AUTH_SOCK) that always offers a fresh certificate.

Certificates last minutes; automation that reads a certificate file (Ansible, Fabric, paramiko, CI)
stops working once it expires. Every SSH client can use an agent instead, so this one holds the user's
key and offers, for each session it serves, a certificate with at least ``keys.MIN_VALID_S`` left,
fetching a new one from the API when a client asks for identities and the current one is about to end.

Only the part of the agent protocol (draft-miller-ssh-agent) that clients need to log in is spoken:
list identities and sign. Anything else (adding or removing keys, locking) is refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli import keys
from cli.config import config_dir
from cli.errors import CliError

log = logging.getLogger(__name__)

FAILURE, SUCCESS = 5, 6
REQUEST_IDENTITIES, IDENTITIES_ANSWER = 11, 12
SIGN_REQUEST, SIGN_RESPONSE = 13, 14
MAX_MESSAGE = 256 * 1024  # OpenSSH's agent limit

Refresh = Callable[[str], Awaitable[None]]


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_string(buf: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(buf):
        raise ValueError("truncated agent message")
    (size,) = struct.unpack_from(">I", buf, offset)
    end = offset + 4 + size
    if end > len(buf):
        raise ValueError("truncated agent message")
    return buf[offset + 4:end], end


def _blob(path: Path) -> bytes | None:
    """The wire form of the certificate (or key) in an OpenSSH public file."""
    try:
        fields = path.read_text(encoding="ascii").split()
        return base64.b64decode(fields[1], validate=True)
    except (OSError, ValueError, IndexError):
        return None


class CertificateAgent:
    """Offers each session's certificate, refreshed through ``refresh(session_id)`` when it runs short."""

    def __init__(self, session_ids: Sequence[str], refresh: Refresh) -> None:
        self.session_ids = list(session_ids)
        self._refresh = refresh
        pair = keys.ensure_key_pair()
        loaded = serialization.load_ssh_private_key(pair.private.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{pair.private} is not an Ed25519 key")
        self._key = loaded
        self._key_blob = _blob(pair.public) or b""
        self._signed: set[bytes] = {self._key_blob}  # every blob this agent has offered for our key
        self._lock = asyncio.Lock()

    async def prime(self) -> None:
        """Fetch what is missing now, so a bad session id or login fails at start, not on first use."""
        async with self._lock:
            for session_id in self.session_ids:
                if keys.needs_refresh(session_id):
                    await self._refresh(session_id)

    async def identities(self) -> list[tuple[bytes, str]]:
        async with self._lock:  # one refresh per session at a time, however many clients ask at once
            out = []
            for session_id in self.session_ids:
                if keys.needs_refresh(session_id):
                    try:
                        await self._refresh(session_id)
                    except Exception as exc:  # the client sees no certificate for it
                        log.warning("could not refresh the certificate of %s: %s", session_id, exc)
                        continue
                blob = _blob(keys.cert_path(session_id))
                if blob is not None:
                    self._signed.add(blob)
                    out.append((blob, f"orzbob {session_id}"))
            return out

    def sign(self, blob: bytes, data: bytes) -> bytes | None:
        if blob not in self._signed:
            return None
        return _string(b"ssh-ed25519") + _string(self._key.sign(data))

    async def answer(self, message: bytes) -> bytes:
        kind, body = message[0], message[1:]
        if kind == REQUEST_IDENTITIES:
            found = await self.identities()
            return bytes([IDENTITIES_ANSWER]) + struct.pack(">I", len(found)) + b"".join(
                _string(blob) + _string(comment.encode()) for blob, comment in found)
        if kind == SIGN_REQUEST:
            blob, offset = _read_string(body, 0)
            data, _ = _read_string(body, offset)
            signature = self.sign(blob, data)
            if signature is not None:
                return bytes([SIGN_RESPONSE]) + _string(signature)
        return bytes([FAILURE])

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                (size,) = struct.unpack(">I", header)
                if not 0 < size <= MAX_MESSAGE:
                    return
                message = await reader.readexactly(size)
                try:
                    reply = await self.answer(message)
                except ValueError:
                    reply = bytes([FAILURE])
                writer.write(_string(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket nothing listens on (an agent killed before it could); refuse anything else at ``path``:
    a file of the user's, or a live agent whose clients would lose it (ssh-agent -a refuses both too)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CliError(f"{path} exists and is not a socket; name another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise CliError(f"an agent already listens on {path}; use it (SSH_AUTH_SOCK={path}) or name another --socket")


async def listen(agent: CertificateAgent, path: Path) -> asyncio.AbstractServer:
    """Serve on a unix socket only its owner can connect to (a stale socket file is replaced)."""
    os.makedirs(path.parent, mode=0o700, exist_ok=True)
    _clear_stale_socket(path)
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(agent.serve_client, path=str(path))
    finally:
        os.umask(old)


MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the final NUL
SHORT_DIR_PREFIX = "orz-agent-"


def default_socket() -> Path:
    """agent.<pid>.sock in the config dir; where that path is too long for a unix socket (a deep HOME or
    XDG_CONFIG_HOME: "AF_UNIX path too long"), in a private directory of its own in the temp dir."""
    path = config_dir() / f"agent.{os.getpid()}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix=SHORT_DIR_PREFIX)) / path.name


def remove_socket(path: Path) -> None:
    """The agent's socket, and the private directory default_socket made for it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if path.parent.name.startswith(SHORT_DIR_PREFIX) and path.parent.parent == Path(tempfile.gettempdir()):
        with contextlib.suppress(OSError):
            path.parent.rmdir()
