"""`orz cloud agent`'s agent (cli/agent.py) with real agent clients: OpenSSH's ssh-add and paramiko."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import paramiko
import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from cli import agent, keys
from cli.errors import CliError

SESSION = "demo-1"


class Minter:
    """Plays the API: certificates for the user's key from a test CA, counting each fetch."""

    def __init__(self, ttl_s: int = 300) -> None:
        self.ca = asyncssh.generate_private_key("ssh-ed25519")
        self.ttl_s = ttl_s
        self.fetched = 0

    def write(self, session_id: str, ttl_s: int) -> None:
        user_key = asyncssh.read_public_key(keys.key_pair().public)
        now = int(time.time())
        cert = self.ca.generate_user_certificate(user_key, "user:test", principals=[session_id],
                                                 valid_after=now - 10, valid_before=now + ttl_s)
        keys.save_certificate(session_id, cert.export_certificate("openssh").decode())

    async def refresh(self, session_id: str) -> None:
        self.fetched += 1
        self.write(session_id, self.ttl_s)


@pytest.fixture
async def served(home: Path) -> AsyncIterator[tuple[Path, Minter]]:
    keys.ensure_key_pair()
    minter = Minter()
    holder = agent.CertificateAgent([SESSION], minter.refresh)
    path = home / "agent.sock"
    server = await agent.listen(holder, path)
    try:
        yield path, minter
    finally:
        server.close()
        await server.wait_closed()


async def ssh_add(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec("ssh-add", *args, env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


async def test_lists_a_certificate_and_fetches_again_only_when_it_runs_short(served: tuple[Path, Minter]) -> None:
    sock, minter = served
    assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0
    listed = await ssh_add(sock, "-L")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[0] == "ssh-ed25519-cert-v01@openssh.com"
    assert listed.stdout.split()[2:] == ["orzbob", SESSION]
    assert (await ssh_add(sock, "-L")).stdout == listed.stdout and minter.fetched == 1

    minter.write(SESSION, ttl_s=30)  # less than a minute left: the next client gets a new one
    again = await ssh_add(sock, "-L")
    assert minter.fetched == 2 and again.stdout != listed.stdout


async def test_signs_with_the_users_key_for_paramiko(served: tuple[Path, Minter],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sock, _ = served
    monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))

    def sign() -> tuple[str, bytes]:
        held = paramiko.Agent()
        try:
            (key,) = held.get_keys()
            return key.get_name(), bytes(key.sign_ssh_data(b"to be signed"))
        finally:
            held.close()

    name, signature = await asyncio.to_thread(sign)
    assert name == "ssh-ed25519-cert-v01@openssh.com"
    algorithm, rest = _string(signature)
    raw, _ = _string(rest)
    assert algorithm == b"ssh-ed25519"
    public = load_ssh_public_key(keys.key_pair().public.read_bytes())
    public.verify(raw, b"to be signed")  # type: ignore[union-attr]


async def test_refuses_what_it_does_not_do(served: tuple[Path, Minter], home: Path) -> None:
    sock, _ = served
    other = home / "other_key"
    other.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    other.chmod(0o600)
    added = await ssh_add(sock, str(other))
    assert added.returncode != 0  # no adding keys

    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        # Signing with a key it does not hold, and a truncated request: SSH_AGENT_FAILURE each time.
        foreign = asyncssh.generate_private_key("ssh-ed25519").public_data
        for message in (bytes([agent.SIGN_REQUEST]) + _pack(foreign) + _pack(b"data") + b"\0\0\0\0",
                        bytes([agent.SIGN_REQUEST]) + b"\0\0\1"):
            writer.write(_pack(message))
            assert await _reply(reader) == bytes([agent.FAILURE])
        writer.write(struct.pack(">I", agent.MAX_MESSAGE + 1))  # too big: the agent hangs up
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


def _pack(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _string(data: bytes) -> tuple[bytes, bytes]:
    (size,) = struct.unpack(">I", data[:4])
    return data[4:4 + size], data[4 + size:]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(size)


async def test_never_takes_a_path_that_is_in_use(served: tuple[Path, Minter], home: Path) -> None:
    """`--socket` naming a file, or another live agent's socket, is refused (ssh-agent -a says 'Address already
    in use'); only a stale socket, with nothing listening, is replaced."""
    live, _ = served
    holder = agent.CertificateAgent([SESSION], Minter().refresh)
    with pytest.raises(CliError, match="already listens"):
        await agent.listen(holder, live)
    assert (await ssh_add(live, "-L")).returncode == 0  # the first agent still serves there

    notes = home / "notes.txt"
    notes.write_text("mine\n")
    with pytest.raises(CliError, match="not a socket"):
        await agent.listen(holder, notes)
    assert notes.read_text() == "mine\n"

    stale = home / "stale.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(stale))  # bound, never listening, then gone: what a killed agent leaves behind
    left.close()
    server = await agent.listen(holder, stale)
    try:
        assert (await ssh_add(stale, "-L")).returncode == 0
    finally:
        server.close()
        await server.wait_closed()


def test_the_default_socket_is_short_enough_under_a_deep_config_dir(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`orz cloud agent` under a deep HOME failed with "orz: AF_UNIX path too long" (its socket in the config
    dir): there the socket goes to a private directory of its own in the temp dir, removed with it."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ("d" * 60) / ("e" * 60)))
    path = agent.default_socket()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))  # where the agent listens
    assert path.parent.stat().st_mode & 0o077 == 0  # the user's own
    agent.remove_socket(path)
    assert not path.parent.exists()
