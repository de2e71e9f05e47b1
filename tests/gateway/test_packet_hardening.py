"""Malformed packets and abrupt hang-ups at the gateway: only that connection ends, quietly, nothing is lost.

Packets are sealed with the gateway's own receive keys (tests/gateway/packets.py), so they pass the
AES-GCM check and reach the fast path (gateway/splice.py) and asyncssh's parser as a hostile client's
would.
"""

from __future__ import annotations

import asyncio
import logging

import asyncssh
import pytest

from gateway import splice
from tests.gateway.conftest import Env, asyncssh_client, eventually
from tests.gateway.packets import Sealer, channel_data


async def spliced(paths: list[splice.FastPath], conn: asyncssh.SSHClientConnection) -> splice.FastPath:
    """The gateway's fast path for this client once a channel of it is spliced."""
    local_port = conn.get_extra_info("sockname")[1]
    for _ in range(100):
        for path in paths:
            peer = path.conn.get_extra_info("peername")
            if isinstance(path.conn, asyncssh.SSHServerConnection) and peer and peer[1] == local_port and path.legs:
                return path
        await asyncio.sleep(0.05)
    raise AssertionError("no spliced channel for this client")


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_zero_length_packet_closes_quietly_and_keeps_the_batched_data(
        env: Env, fast_paths: list[splice.FastPath], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process("cat > got.bin", encoding=None)
        path = await spliced(fast_paths, conn)
        channel = next(iter(path.legs))
        sealer = Sealer(path.conn)
        # One read: a data packet the fast path batches, then a zero-length packet with a valid tag.
        path.data_received(sealer.payload(channel_data(channel, b"batched before the bad packet"))
                           + sealer.seal(b"", length=0))
        await asyncio.wait_for(conn.wait_closed(), 10)
        process.close()
    got = env.runner.workspace / "got.bin"
    await eventually(lambda: got.exists() and got.read_bytes() == b"batched before the bad packet", "the data")
    assert not errors(caplog), [r.getMessage() for r in errors(caplog)]
    result = await env.ssh(*env.cert_args(), "--", "echo still here")
    assert result.returncode == 0 and result.stdout == b"still here\n"


@pytest.mark.parametrize("tty", [False, True], ids=["exec", "pty"])
async def test_clients_killed_mid_output_leave_no_errors(env: Env, caplog: pytest.LogCaptureFixture,
                                                         tty: bool) -> None:
    """Clients SIGKILLed while the session floods them: the gateway logs no ERROR and serves on."""
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        for _ in range(20):
            argv = [*env.base_args(), *env.cert_args(), *(["-tt"] if tty else []), "demo-1@127.0.0.1",
                    "yes flooding-the-client"]
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.DEVNULL)
            assert proc.stdout is not None
            seen = b""
            while len(seen) < 200_000:
                chunk = await asyncio.wait_for(proc.stdout.read(65536), 15)
                assert chunk, "the session's output stopped early"
                seen += chunk
            proc.kill()
            await asyncio.wait_for(proc.stdout.read(), 15)  # drained: the pipe can report its end
            await asyncio.wait_for(proc.wait(), 15)
        await eventually(lambda: not env.gateway.connections, "the gateway to let go of the clients")
        await eventually(lambda: not env.runner.commands_running, "the runner to end the floods")
        await asyncio.sleep(0.2)  # callbacks already scheduled for the closed channels run now
    finally:
        loop.set_exception_handler(previous)
    assert not unhandled, [str(c.get("exception") or c.get("message")) for c in unhandled]
    assert not errors(caplog), [r.getMessage() for r in errors(caplog)]
    result = await env.ssh(*env.cert_args(), "--", "echo still here")
    assert result.returncode == 0 and result.stdout == b"still here\n"


async def test_output_batched_as_the_client_hangs_up_is_dropped_quietly(env: Env) -> None:
    """The deterministic core of the case above: output batched for the end of a loop turn, and the
    client's channel closing within that same turn. The batch must not be written to the closed channel."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        async with await asyncssh_client(env) as conn:
            await conn.create_process("cat", encoding=None)
            await eventually(lambda: any(c.attachment and c.attachment.sessions for c in env.gateway.connections),
                             "the bridged session")
            client = next(c for c in env.gateway.connections if c.attachment and c.attachment.sessions)
            assert client.attachment is not None
            bridge = next(iter(client.attachment.sessions))
            bridge.from_upstream(b"goes out at once", None)
            bridge.from_upstream(b"batched for the end of this turn", None)
            assert bridge._chan is not None
            bridge._chan.close()  # the client is gone before the turn ends
            await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(previous)
    assert not unhandled, [str(c.get("exception") or c.get("message")) for c in unhandled]
