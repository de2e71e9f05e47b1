"""The gateway's keepalive checks on one timer per process (gateway/keepalive.py) do what asyncssh's own
timers did: a client that answers keeps its connection, a silent one loses it."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncssh
import pytest

from gateway import splice
from tests.gateway.conftest import Env, asyncssh_client, eventually


async def test_an_answering_client_keeps_its_connection(env: Env, fast_paths: list[splice.FastPath],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    checks: Counter[str] = Counter()
    original = asyncssh.connection.SSHConnection._keepalive_timer_callback

    def counted(self: Any) -> None:
        checks[type(self).__name__] += 1
        original(self)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "_keepalive_timer_callback", counted)
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        held = [path.conn for path in fast_paths if type(path.conn).__name__.endswith("SideConnection")]
        assert len(held) == 2 and all(type(c._keepalive_timer) is int for c in held)  # on the wheel, no handle
        for side in held:  # armed for 30 s and 60 s: a shorter one now must not wait for those
            side._keepalive_interval, side._keepalive_count_max = 1, 1
            side._reset_keepalive_timer()
        await eventually(lambda: min(checks[type(c).__name__] for c in held) >= 3, "three checks on each side")
        assert all(c._keepalive_count <= 1 for c in held)  # each answered
        process.stdin.write(b"ping")
        assert await asyncio.wait_for(process.stdout.readexactly(6), 5) == b"pong\r\n"


async def test_a_silent_client_loses_its_connection(env: Env, fast_paths: list[splice.FastPath]) -> None:
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        (client_side,) = [path.conn for path in fast_paths if type(path.conn).__name__ == "ClientSideConnection"]
        client_side._keepalive_interval, client_side._keepalive_count_max = 1, 1
        client_side._reset_keepalive_timer()
        conn._transport.pause_reading()  # the client reads (and answers) nothing from now on
        await eventually(lambda: not env.gateway.connections, "the gateway closing the silent connection", 8)
        assert client_side._keepalive_timer is None
