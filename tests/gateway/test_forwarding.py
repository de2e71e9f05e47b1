"""Port forwarding through the gateway: -L and -D reach a port in the session, -R listens in it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from tests.gateway.conftest import SESSION, Env, gateway_env
from tests.support import ROOT, free_port


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


_OPENED: list[asyncio.StreamWriter] = []  # this test's connections from _connect, closed by _close_connections


@pytest.fixture(autouse=True)
async def _close_connections() -> AsyncIterator[None]:
    """Every connection _connect opened is closed when its test ends, also when the test fails half-way.
    A failed test's open connections outlived it (its traceback holds them, in reference cycles) until a
    garbage collection in some later test found them unclosed: CI's test_packet_fuzz failed on the
    "unclosed <socket.socket ...>" of the channel-cap test's held connections."""
    yield
    while _OPENED:
        writer = _OPENED.pop()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _connect(port: int, deadline_s: float = 8) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            _OPENED.append(writer)
            return reader, writer
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


async def _roundtrip_or_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes) -> bytes:
    """The echoed line, or b"" when ssh closed the forwarded connection because its channel was refused.

    ssh closes that socket with our line still unread in it, so the kernel may answer with a reset
    instead of an orderly end of stream; either way the user's client sees the connection dropped.
    """
    try:
        return await _roundtrip(reader, writer, text)
    except (ConnectionResetError, BrokenPipeError):
        writer.close()
        return b""


async def test_local_forward(env: Env, echo_port: int) -> None:
    local = free_port()
    async with ssh_forwarding(env, "-L", f"{local}:127.0.0.1:{echo_port}"):
        reader, writer = await _connect(local)
        assert await _roundtrip(reader, writer, b"hello") == b"echo:hello\n"


async def test_dynamic_forward_socks(env: Env, echo_port: int) -> None:
    local = free_port()
    async with ssh_forwarding(env, "-D", f"127.0.0.1:{local}"):
        reader, writer = await _connect(local)
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", echo_port))
        reply = await asyncio.wait_for(reader.readexactly(10), 5)
        assert reply[1] == 0, reply
        assert await _roundtrip(reader, writer, b"socks") == b"echo:socks\n"


async def test_forward_outside_loopback_refused(env: Env) -> None:
    local = free_port()
    async with ssh_forwarding(env, "-L", f"{local}:192.0.2.1:80"):
        reader, writer = await _connect(local)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the runner refuses: closed at once
        writer.close()


async def test_remote_forward(env: Env, echo_port: int) -> None:
    remote = free_port()
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


async def test_channels_beyond_the_per_connection_cap_are_refused_with_why(tmp_path: Path, echo_port: int) -> None:
    """One SSH connection holds at most ORZ_GATEWAY_CHANNELS_PER_CONNECTION channels (each one costs the
    gateway and the runner a channel and an API-checked attach's resources): OpenSSH's next -L connection is
    refused with the reason, and one closed makes room again."""
    async with gateway_env(tmp_path, gateway_channels_per_connection=3) as env:
        local = free_port()
        async with ssh_forwarding(env, "-L", f"{local}:127.0.0.1:{echo_port}") as proc:
            held = []
            for n in range(3):
                reader, writer = await _connect(local)
                writer.write(b"hi%d\n" % n)
                await writer.drain()
                assert await asyncio.wait_for(reader.readline(), 5) == b"echo:hi%d\n" % n
                held.append((reader, writer))
            reader, writer = await _connect(local)
            assert await _roundtrip_or_closed(reader, writer, b"more") == b""  # ssh closed it: the channel was refused
            # One closed: the next one gets through (once the gateway has seen that channel close).
            held.pop()[1].close()
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while True:
                reader, writer = await _connect(local)
                line = await _roundtrip_or_closed(reader, writer, b"again")
                if line or loop.time() > end:
                    break
                await asyncio.sleep(0.2)
            assert line == b"echo:again\n"
            for _, w in held:
                w.close()
            proc.terminate()
            stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
        assert "open failed" in stderr and "orz: this connection has 3 channels open" in stderr, stderr


async def test_controlmaster_sessions_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    """OpenSSH's ControlMaster multiplexes sessions as channels of one connection: the cap holds for them too."""
    async with gateway_env(tmp_path, gateway_channels_per_connection=2) as env:
        sock = str(tmp_path / "mux.sock")
        mux = ["-S", sock, "-o", "ControlMaster=no"]
        pipe = asyncio.subprocess.PIPE
        master = await asyncio.create_subprocess_exec(
            *env.base_args(), *env.cert_args(), "-N", "-M", "-S", sock, "-o", "ControlPersist=no",
            f"{SESSION}@127.0.0.1", stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe)
        sleepers: list[asyncio.subprocess.Process] = []
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while not Path(sock).exists() and loop.time() < end:
                await asyncio.sleep(0.1)
            for _ in range(2):
                sleepers.append(await asyncio.create_subprocess_exec(
                    *env.base_args(), *mux, f"{SESSION}@127.0.0.1", "--", "sleep 30",
                    stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe))
            while env.runner.commands_running < 2 and loop.time() < end:
                await asyncio.sleep(0.1)
            assert env.runner.commands_running == 2
            third = await env.ssh(*mux, "--", "echo in")
            assert third.returncode != 0 and b"in" not in third.stdout, third
        finally:
            for proc in [*sleepers, master]:
                if proc.returncode is None:
                    proc.terminate()
                await proc.wait()
        stderr = (await master.stderr.read()).decode() if master.stderr else ""
        assert "orz: this connection has 2 channels open" in stderr, stderr


FAILS_HOLDING_A_CONNECTION = '''
import gc
import socket

from tests.gateway.test_forwarding import _close_connections, _connect  # noqa: F401


async def test_fails_holding_a_connection():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        await _connect(listener.getsockname()[1])
        raise AssertionError("failed with the connection open")


def test_the_next_test():
    gc.collect()  # what any later test may do (a garbage collection): it finds nothing left unclosed
'''


def test_a_failed_forwarding_test_leaves_no_connection_to_a_later_test(tmp_path: Path) -> None:
    """A forwarding test that fails half-way closes its connections itself: only it fails, not whichever
    later test happens to run the garbage collection that finds them (CI's test_packet_fuzz)."""
    (tmp_path / "test_inner.py").write_text(FAILS_HOLDING_A_CONNECTION)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    # Only the failing test fails: no error at its teardown nor in the next test for an unclosed socket.
    assert done.stdout.strip().splitlines()[-1].startswith("1 failed, 1 passed in"), done.stdout[-3000:]
    assert "Unraisable" not in done.stdout, done.stdout[-3000:]
