"""What an idle attached session lets go of (gateway/idle.py, and the fast path's idle sweep) is never
missed later: key exchanges whichever side starts them, keystrokes after a quiet spell, the runner going
away. The memory figures themselves are bench/real_path.py's (`--only hold`), not the tests'."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncssh
import pytest

from gateway import idle, splice
from tests.gateway.conftest import Env, asyncssh_client

LATER = 1 << 40  # a rekey limit no test reaches


async def test_a_held_session_rekeys_whoever_starts_it(env: Env, fast_paths: list[splice.FastPath],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After the session sat idle (set-up state and AES-GCM contexts let go of), the client, the gateway
    (on both its connections) and the runner each start a key exchange; every keystroke still echoes."""
    await env.runner.close()
    env.runner.rekey_bytes = 20_000  # the runner starts one once it has sent this much
    await env.runner.start()
    env.api.sessions["demo-1"].route = env.runner.route
    newkeys: Counter[str] = Counter()
    original = asyncssh.connection.SSHConnection.send_newkeys

    def counted(self: Any, k: bytes, h: bytes) -> None:
        newkeys[type(self).__name__] += 1
        original(self, k, h)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "send_newkeys", counted)
    # asyncssh's most detailed debug logging formats what a key exchange sends, whether or not a handler
    # is listening: what the gateway shares must still read as what asyncssh made (lists stay lists).
    monkeypatch.setattr(asyncssh.logging.SSHLogger, "_debug_level", 2)
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        gateway_side = {type(path.conn).__name__: path.conn for path in fast_paths}
        assert set(gateway_side) == {"ClientSideConnection", "RunnerSideConnection"}
        for path in fast_paths:  # two quiet sweeps
            path.forget_idle_contexts()
            path.forget_idle_contexts()
        # What this test is about: key exchanges after these went.
        assert all(held._client_kexinit == held._server_kexinit == b"" for held in gateway_side.values())
        assert all(path._open.aead is None and path._seal.aead is None for path in fast_paths)

        async def typed(word: bytes) -> None:
            process.stdin.write(word)
            assert await asyncio.wait_for(process.stdout.readexactly(len(word)), 10) == word

        async def rekeyed_by(*starters: Any) -> Counter[str]:
            """Key exchanges that one keystroke set off, each of `starters` at its rekey limit."""
            before = newkeys.copy()
            for starter in starters:
                starter._rekey_bytes = starter._rekey_bytes_sent  # reached: the next packet it sends starts one
            await typed(b"k")
            for starter in starters:
                starter._rekey_bytes = LATER
            return newkeys - before

        assert (await rekeyed_by(conn))["ClientSideConnection"] >= 1  # the client starts it
        done = await rekeyed_by(*gateway_side.values())  # the gateway, on both hops
        assert done["ClientSideConnection"] >= 1 and done["RunnerSideConnection"] >= 1
        # The gateway at a limit every packet reaches, while an echo flows: a key exchange's end starts the
        # next at once (asyncssh sends the packets it held back, and the second is over the limit).
        before = newkeys.copy()
        for held in gateway_side.values():
            held._rekey_bytes = 1
        await typed(b"y" * 100_000)
        for held in gateway_side.values():
            held._rekey_bytes = LATER
        assert (newkeys - before)["ClientSideConnection"] >= 2
        before = newkeys.copy()
        await typed(b"x" * 25_000)  # the runner echoes past its limit
        await typed(b"after the runner's")
        assert (newkeys - before)["RunnerSideConnection"] >= 1
        # And again after a quiet spell: the KEXINITs of those exchanges went too, rekeys still work.
        assert all(held._client_kexinit == held._server_kexinit == b"" for held in gateway_side.values())
        assert (await rekeyed_by(conn, *gateway_side.values()))["RunnerSideConnection"] >= 1
        process.stdin.write(b"ping")
        assert await asyncio.wait_for(process.stdout.readexactly(6), 5) == b"pong\r\n"
        # What those key exchanges wrote again that is the same for every connection went back to the class:
        # of asyncssh's ~150 attributes, fewer than a third stay in each connection's own dict.
        assert max(len(vars(held)) for held in gateway_side.values()) < 50
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), 5)
    assert process.exit_status == 0


async def test_more_channels_after_the_set_up_state_went(env: Env) -> None:
    """A connection that let go of its options opens more channels with the same defaults (ssh -M style)."""
    async with await asyncssh_client(env) as conn:
        for n in range(3):
            result = await conn.run(f"echo {n}", check=False, encoding=None)
            assert result.stdout == f"{n}\n".encode() and result.exit_status == 0
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        process.stdin.write(b"ping")
        assert await asyncio.wait_for(process.stdout.readexactly(6), 5) == b"pong\r\n"


async def test_the_client_goes_when_the_runner_connection_does(env: Env, fast_paths: list[splice.FastPath]) -> None:
    """The runner's connection drops (no task waits for it any more: a callback ends the client's)."""
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        upstream = next(path.conn for path in fast_paths if isinstance(path.conn, asyncssh.SSHClientConnection))
        upstream.abort()
        await asyncio.wait_for(conn.wait_closed(), 5)
    for _ in range(50):
        if not env.gateway.connections:
            break
        await asyncio.sleep(0.1)
    assert not env.gateway.connections


async def test_without_the_state_it_relies_on_nothing_is_let_go_of(env: Env, fast_paths: list[splice.FastPath],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """On an asyncssh that keeps its state differently, the gateway keeps what asyncssh keeps, says so once,
    and sessions work as before."""
    monkeypatch.setattr(idle, "_CONN_STATE", (*idle._CONN_STATE, "_renamed_in_a_future_asyncssh"))
    monkeypatch.setattr(idle, "_usable_by_class", {})
    for _ in range(2):
        result = await env.ssh(*env.cert_args(), "--", "echo still here")
        assert result.returncode == 0 and result.stdout == b"still here\n"
    assert caplog.text.count("this asyncssh lacks connection._renamed_in_a_future_asyncssh") == 2  # once a class
    assert all(path.conn._server_kexinit for path in fast_paths)


async def test_an_attached_connection_keeps_the_mode_not_the_reply(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once attached, a connection keeps the API's mode and lets go of the rest of its reply (the route); the
    mode still decides what later channels may do, and each of them is still authorized again."""
    answer = env.api._authorize

    def read_only(req: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        status, reply = answer(req)
        if reply is not None and status == 200:
            reply["mode"] = "ro"  # the API's say, with a read-write credential
        return status, reply

    monkeypatch.setattr(env.api, "_authorize", read_only)
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        assert b"read-only" in await asyncio.wait_for(process.stdout.readuntil(b"\r\n"), 5)
        (handler,) = env.gateway.connections
        assert handler.reply is None and handler.mode == "ro" and handler.readonly
        calls = len(env.api.authorize_calls)
        refused = await conn.run("echo in", check=False, encoding=None)  # read-only: no exec, and why
        assert refused.exit_status == 1 and b"read-only" in refused.stderr and refused.stdout == b""
        again = await conn.create_process(term_type="xterm", encoding=None)
        assert b"read-only" in await asyncio.wait_for(again.stdout.readuntil(b"\r\n"), 5)
        assert len(env.api.authorize_calls) == calls + 1  # the second shell asked the API again


class _Shares:
    shares_constants = True

    def method(self) -> str:
        return "the class's"


class _SharesToo(_Shares):
    """A subclass takes no part unless it says so itself."""


def test_constants_move_to_the_class_and_read_the_same() -> None:
    first, second, third, other = _Shares(), _Shares(), _Shares(), _SharesToo()
    for obj in (first, second, third, other):
        obj.flag, obj.limit, obj.name, obj.pair = True, 3, b"aes", (1, "x")
        obj.items, obj.when, obj.nested = [], 1.5, (1, [])
        obj.method = None  # type: ignore[method-assign]  # shadows the class's: never moved there
    third.limit = 4
    idle.share_constants(first)  # not settled: the class has nothing yet, so nothing moves
    assert len(vars(first)) == 8
    for obj in (first, second, third, other):
        idle.share_constants(obj, settled=True)
    assert set(vars(first)) == set(vars(second)) == {"items", "when", "nested", "method"}
    assert set(vars(third)) == {"items", "when", "nested", "method", "limit"}  # its own value stays its own
    assert len(vars(other)) == 8 and "flag" not in vars(_SharesToo)
    assert (first.flag, first.limit, first.name, first.pair, third.limit) == (True, 3, b"aes", (1, "x"), 4)
    first.limit = 5  # a write is the instance's alone
    assert (first.limit, second.limit, _Shares().method()) == (5, 3, "the class's")
