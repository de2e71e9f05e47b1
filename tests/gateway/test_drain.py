"""Gateway.drain (what `orz gateway` does on SIGTERM), in process: who is told what, what still works.

The process-level version (a real SIGTERM, the real ssh, tmux and `orz cloud attach`) is
tests/cli/test_gateway_drain.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from api.schemas import GATEWAY_RESTARTING
from tests.gateway.conftest import Env, asyncssh_client, browser_terminal, eventually


async def test_terminals_are_told_data_channels_are_left_alone_and_nobody_new_gets_in(env: Env) -> None:
    async with await asyncssh_client(env) as conn:
        shell = await conn.create_process(term_type="xterm", encoding=None)
        assert await asyncio.wait_for(shell.stdout.readuntil(b"hi"), 5)
        piped = await conn.create_process("cat", encoding=None)  # an exec channel: its bytes are data
        piped.stdin.write(b"one\n")
        assert await asyncio.wait_for(piped.stdout.readline(), 5) == b"one\n"

        stop = asyncio.get_running_loop().create_future()
        draining = asyncio.ensure_future(env.gateway.drain(60, stop))
        # The terminal reads why and how to come back (a pty shows stderr too); the shell keeps working.
        seen = await asyncio.wait_for(shell.stderr.readuntil(b"(or it reconnects by itself)\r\n"), 5)
        assert GATEWAY_RESTARTING.encode() in seen and b"`orz cloud attach demo-1`" in seen
        shell.stdin.write(b"ping\n")
        assert await asyncio.wait_for(shell.stdout.readuntil(b"pong"), 5)

        web = f"http://127.0.0.1:{env.gateway.web.port}" if env.gateway.web else ""
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{web}/readyz")).status_code == 503
            assert (await http.get(f"{web}/healthz")).status_code == 200
            page = await http.get(f"{web}/s/demo-1")
            assert page.status_code == 503 and GATEWAY_RESTARTING in page.text
            scrape = await http.get(f"http://127.0.0.1:{env.settings.gateway_metrics_port}/metrics")
            assert "orz_gateway_connections_draining 1.0" in scrape.text
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncssh_client(env), 5)  # the listener is closed

        piped.stdin.write(b"two\n")
        assert await asyncio.wait_for(piped.stdout.readline(), 5) == b"two\n"
        assert not draining.done()

        stop.set_result(None)  # a second signal: the rest end now, with the reason
        assert await asyncio.wait_for(draining, 5) == "signal"
        await asyncio.wait_for(conn.wait_closed(), 5)
    rest_out, rest_err = await asyncio.wait_for(piped.communicate(), 5)
    assert rest_out == b"" and rest_err == b""  # nothing was written into the exec channel's streams


async def test_a_drain_with_nothing_open_ends_at_once(env: Env) -> None:
    never = asyncio.get_running_loop().create_future()
    assert await asyncio.wait_for(env.gateway.drain(60, never), 5) == "drained"


async def test_the_deadline_ends_connections_with_the_reason(env: Env) -> None:
    async with await asyncssh_client(env) as conn:
        shell = await conn.create_process(term_type="xterm", encoding=None)
        assert await asyncio.wait_for(shell.stdout.readuntil(b"hi"), 5)
        # OpenSSH with no session channel (ssh -N, a tunnel): it prints the disconnect message itself.
        tunnel = await asyncio.create_subprocess_exec(
            *env.base_args(), "-N", *env.cert_args(), "demo-1@127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        await eventually(lambda: sum(c.attached_at is not None for c in env.gateway.connections) == 2,
                         "both connections to attach")
        never = asyncio.get_running_loop().create_future()
        assert await asyncio.wait_for(env.gateway.drain(0.5, never), 10) == "deadline"
        # The terminal reads that its connection ends now; then it ends.
        said = await asyncio.wait_for(shell.stderr.read(), 5)
        assert b"this connection ends now" in said and b"`orz cloud attach demo-1`" in said
        await asyncio.wait_for(conn.wait_closed(), 5)
        _, err = await asyncio.wait_for(tunnel.communicate(), 10)
        assert tunnel.returncode == 255
        assert f"orz: {GATEWAY_RESTARTING}; reconnect with `orz cloud attach demo-1`" in err.decode(), err
    await eventually(lambda: not env.gateway.connections, "the connections to go")


async def test_a_browser_terminal_reads_the_line_then_ends_with_the_reason(env: Env) -> None:
    async with browser_terminal(env) as term:
        await term.until(b"hi")
        stop = asyncio.get_running_loop().create_future()
        draining = asyncio.ensure_future(env.gateway.drain(60, stop))
        await term.until(GATEWAY_RESTARTING.encode())  # the line, in the terminal
        await term.ws.send(b"ping\r")  # still working
        await term.until(b"pong")
        stop.set_result(None)
        await term.until_closed()
        assert await asyncio.wait_for(draining, 5) == "signal"
        assert term.ws.close_code == 4001 and GATEWAY_RESTARTING in (term.ws.close_reason or "")
        assert any(GATEWAY_RESTARTING in str(c.get("message")) for c in term.control), term.control
