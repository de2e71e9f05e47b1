"""Port forwarding through the gateway: -L and -D reach a port in the session, -R listens in it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from tests.gateway.conftest import SESSION, Env, gateway_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP service 'inside the session' (loopback): answers each line with 'echo:<line>'."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"echo:" + line)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@contextlib.asynccontextmanager
async def ssh_forwarding(env: Env, *forward: str) -> AsyncIterator[asyncio.subprocess.Process]:
    argv = [*env.base_args(), *env.cert_args(), "-N", "-o", "ExitOnForwardFailure=yes", *forward,
            f"{SESSION}@127.0.0.1"]
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=pipe,
                                                stderr=pipe)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def _connect(port: int, deadline_s: float = 8) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.1)


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    writer.write(text + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return line


async def test_local_forward(env: Env, echo_port: int) -> None:
    local = _free_port()
    async with ssh_forwarding(env, "-L", f"{local}:127.0.0.1:{echo_port}"):
        reader, writer = await _connect(local)
        assert await _roundtrip(reader, writer, b"hello") == b"echo:hello\n"


async def test_dynamic_forward_socks(env: Env, echo_port: int) -> None:
    local = _free_port()
    async with ssh_forwarding(env, "-D", f"127.0.0.1:{local}"):
        reader, writer = await _connect(local)
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
        reply = await asyncio.wait_for(reader.readexactly(10), 5)
        assert reply[1] == 0, reply
        assert await _roundtrip(reader, writer, b"socks") == b"echo:socks\n"


async def test_forward_outside_loopback_refused(env: Env) -> None:
    local = _free_port()
    async with ssh_forwarding(env, "-L", f"{local}:192.0.2.1:80"):
        reader, writer = await _connect(local)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the runner refuses: closed at once
        writer.close()


async def test_remote_forward(env: Env, echo_port: int) -> None:
    remote = _free_port()
    async with ssh_forwarding(env, "-R", f"127.0.0.1:{remote}:127.0.0.1:{echo_port}"):
        # The runner listens "inside the session" (here: this machine's loopback).
        reader, writer = await _connect(remote)
        assert await _roundtrip(reader, writer, b"back") == b"echo:back\n"


async def test_forwarding_turned_off_holds_for_attach_tokens_too(tmp_path: Path, echo_port: int) -> None:
    """ORZ_PERMIT_PORT_FORWARDING=false left it out of certificates (which asyncssh enforces); a login with an
    attach token (ssh's password prompt, the web door's tunnel) carries no certificate and forwarded anyway."""
    async with (
        gateway_env(tmp_path, permit_port_forwarding=False) as env,
        asyncssh.connect("127.0.0.1", env.port, username=SESSION, password=env.token(), client_keys=None,
                         known_hosts=str(env.known_hosts), config=None, agent_path=None) as conn,
    ):
        with pytest.raises(asyncssh.ChannelOpenError, match="not permitted"):
            await conn.open_connection("127.0.0.1", echo_port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", echo_port)
        done = await conn.run("echo in", check=True)  # the session itself still works
        assert done.stdout == "in\n"
