"""The gateway's fast path for session bytes (gateway/splice.py), through a real gateway.

Each test checks what a user would see (echoes, exact bytes, order, exit status) and that the bytes
really took the fast path (or, where asked, did not): a spy records the FastPath of every connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from gateway import idle, keepalive, splice, window
from tests.gateway.conftest import Env, asyncssh_client, gateway_env
from tests.support import free_port


def relayed(paths: list[splice.FastPath], *, arriving_from: str = "") -> int:
    """Packets relayed on the fast path; `arriving_from` "client" or "runner" picks one direction."""
    sides = {"client": asyncssh.SSHServerConnection, "runner": asyncssh.SSHClientConnection}
    return sum(p.relayed_packets for p in paths if not arriving_from or isinstance(p.conn, sides[arriving_from]))


async def test_keystrokes_and_echoes_take_the_fast_path(env: Env, fast_paths: list[splice.FastPath],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.server")
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        before = relayed(fast_paths)
        for word in (b"one", b"two", b"ping"):
            process.stdin.write(word)
            expected = b"pong\r\n" if word == b"ping" else word
            assert await asyncio.wait_for(process.stdout.readexactly(len(expected)), 5) == expected
        # Each keystroke and each echo crossed the gateway on the fast path, once per direction.
        assert relayed(fast_paths) - before >= 6
        client_side = next(c for c in env.gateway.connections)
        assert client_side.attachment is not None
        assert client_side.attachment.counters.bytes_in == len(b"onetwoping")
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), 5)
    assert process.exit_status == 0
    # The detach log line says how much the fast path carried (operators see when it is off).
    for _ in range(50):
        detached = [r for r in caplog.records if getattr(r, "event", None) == "detached"]
        if detached:
            break
        await asyncio.sleep(0.1)
    assert detached and detached[0].fast_path_packets == relayed(fast_paths) >= 6


async def test_keystrokes_after_an_idle_spell_take_the_fast_path_again(env: Env,
                                                                       fast_paths: list[splice.FastPath]) -> None:
    """An idle session lets go of its kept AES-GCM contexts (memory per held session); the next keystrokes
    echo as before, on the fast path, with contexts built anew."""
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        process.stdin.write(b"one")
        assert await asyncio.wait_for(process.stdout.readexactly(3), 5) == b"one"
        assert any(path._open.aead is not None for path in fast_paths)
        # Two sweeps with nothing in between (what IDLE_SWEEP_S of quiet does): the first notes the counts,
        # the second finds them unchanged and lets go.
        for _ in range(2):
            for path in fast_paths:
                path.forget_idle_contexts()
        assert all(path._open.aead is None and path._seal.aead is None for path in fast_paths)
        before = relayed(fast_paths)
        for word in (b"two", b"ping"):
            process.stdin.write(word)
            expected = b"pong\r\n" if word == b"ping" else word
            assert await asyncio.wait_for(process.stdout.readexactly(len(expected)), 5) == expected
        assert relayed(fast_paths) - before >= 4  # each keystroke and echo, once per direction
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), 5)
    assert process.exit_status == 0


async def test_the_installed_asyncssh_keeps_the_state_the_fast_path_needs(env: Env,
                                                                        fast_paths: list[splice.FastPath]) -> None:
    """The guard on pyproject's asyncssh pin: on a release that moved the internals gateway/splice.py and
    gateway/idle.py read, this names what is missing (the gateway would run, with one log line, without its
    fast path or keeping what idle sessions need not)."""
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        legs = [leg for path in fast_paths for leg in path.legs.values()]
        missing = sorted({m for path in fast_paths for m in splice.missing_state(path.conn)}
                         | {m for leg in legs for m in splice.missing_state(leg.src.get_connection(), leg.src)})
        assert not missing, (f"asyncssh {asyncssh.__version__} lacks what gateway/splice.py relies on: "
                             f"{', '.join(missing)}; update splice.py before raising the pin in pyproject.toml")
        # What gateway/idle.py lets go of once a session is set up (its memory per idle session).
        missing = sorted({m for path in fast_paths for m in idle.missing_state(path.conn)}
                         | {m for leg in legs for m in idle.missing_state(leg.src.get_connection(), leg.src)})
        assert not missing, (f"asyncssh {asyncssh.__version__} lacks what gateway/idle.py relies on: "
                             f"{', '.join(missing)}; update idle.py before raising the pin in pyproject.toml")
        assert legs, f"asyncssh {asyncssh.__version__}: no bridge took the fast path"
        # gateway/window.py's back-pressure overrides a channel method: the same guard for its state.
        held = sorted({m for leg in legs for m in window.missing_state(leg.src)})
        assert not held, (f"asyncssh {asyncssh.__version__} lacks what gateway/window.py relies on: "
                          f"{', '.join(held)}; update window.py before raising the pin in pyproject.toml")
        assert all(getattr(type(leg.src), "holds_window", False) for leg in legs), "a bridged channel lost hold_window"
        # gateway/keepalive.py's one timer for every connection's keepalive checks.
        missing = sorted({m for path in fast_paths for m in keepalive.missing_state(path.conn)})
        assert not missing, (f"asyncssh {asyncssh.__version__} lacks what gateway/keepalive.py relies on: "
                             f"{', '.join(missing)}; update keepalive.py before raising the pin in pyproject.toml")
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), 5)


def _newkeys(stderr: bytes) -> int:
    """Key exchanges the OpenSSH client completed (the first one included), from its -v log."""
    return stderr.count(b"SSH2_MSG_NEWKEYS received")


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "asyncssh-path"])
async def test_bulk_both_ways_exact_across_client_rekeys(tmp_path: Path, fast_paths: list[splice.FastPath],
                                                         fast: bool) -> None:
    """8 MiB up and down, the client re-keying every 256 KiB: same bytes, in order, either path."""
    data = os.urandom(8 << 20)
    async with gateway_env(tmp_path, gateway_fast_path=fast) as env:
        rekey = ["-v", "-o", "RekeyLimit=256K", "-o", "Ciphers=aes128-gcm@openssh.com"]
        up = await env.ssh(*env.cert_args(), *rekey, "--", "cat > up.bin", stdin=data, timeout=60)
        assert up.returncode == 0, up.stderr[-500:]
        assert hashlib.sha256((env.runner.workspace / "up.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
        # Straight into a file: a reader on this test's event loop would hold the gateway back itself.
        out = tmp_path / "down.bin"
        with out.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                *env.base_args(), *env.cert_args(), *rekey, "demo-1@127.0.0.1", "cat up.bin; echo done >&2",
                stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=asyncio.subprocess.PIPE)
            _, down_err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and out.read_bytes() == data and b"\ndone\n" in down_err
        assert _newkeys(up.stderr) > 10 and _newkeys(down_err) > 3  # key exchanges mid-stream, both ways
    if fast:
        # 32 KiB packets, 256 each way. Up, nearly all take the fast path (the runner's cat keeps up). Down,
        # the client writing to disk is the slower end: whenever its window runs short, data queues on
        # asyncssh's path and the packets after it follow there until that queue drains, so how many take
        # the fast path depends on the machine's load (44-128 seen): some must, none may be lost.
        assert relayed(fast_paths, arriving_from="client") > 200
        assert relayed(fast_paths, arriving_from="runner") >= 16
    else:
        assert relayed(fast_paths) == 0


async def test_gateway_and_runner_rekeys_mid_stream(env: Env, fast_paths: list[splice.FastPath],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's own connections re-key (its send side starts it) and so does the runner."""
    await env.runner.close()
    env.runner.rekey_bytes = 1_000_000
    await env.runner.start()
    env.api.sessions["demo-1"].route = env.runner.route
    original = splice.splice

    def small_rekey_limit(client_chan: Any, upstream_chan: Any, **kw: Any) -> bool:
        # Once authenticated (asyncssh re-reads its options at auth): both gateway connections re-key
        # after 512 kB sent, so the fast path's send side must hand over to asyncssh to start them.
        for chan in (client_chan, upstream_chan):
            chan.get_connection()._rekey_bytes = 512_000
        return original(client_chan, upstream_chan, **kw)

    monkeypatch.setattr(splice, "splice", small_rekey_limit)
    data = os.urandom(8 << 20)
    result = await env.ssh(*env.cert_args(), "-v", "--", "cat > in.bin && cat in.bin", stdin=data, timeout=90)
    assert result.returncode == 0 and result.stdout == data, result.stderr[-500:]
    assert _newkeys(result.stderr) > 5  # key exchanges the gateway started with the client
    # Between key exchanges the fast path carries data (how much, and which way, depends on timing).
    assert relayed(fast_paths) > 0


async def test_a_slow_reader_gets_every_byte_in_order(env: Env, fast_paths: list[splice.FastPath]) -> None:
    """The client stops reading for a while: flow control holds the session back, nothing is lost."""
    expected = b"".join(b"%d\n" % i for i in range(1, 200_001))
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process("seq 1 200000", encoding=None)
        got = bytearray()
        while chunk := await asyncio.wait_for(process.stdout.read(8192), 10):
            got += chunk
            if len(got) < 600_000:
                await asyncio.sleep(0.002)  # a reader slower than the session, then a fast one
        await process.wait_closed()
    assert bytes(got) == expected and process.exit_status == 0
    assert relayed(fast_paths, arriving_from="runner") > 0


async def test_stdout_and_stderr_stay_apart_and_whole(env: Env) -> None:
    script = "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done; exit 7"
    result = await env.ssh(*env.cert_args(), "--", script, timeout=30)
    assert result.returncode == 7
    assert result.stdout == b"".join(b"out%d\n" % i for i in range(2000))
    assert result.stderr == b"".join(b"err%d\n" % i for i in range(2000))


async def test_packets_split_across_reads(env: Env, fast_paths: list[splice.FastPath],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """TCP may cut packets anywhere: the fast path waits for the rest at the packet boundary."""
    whole = splice.FastPath.data_received

    def in_pieces(self: splice.FastPath, data: bytes) -> None:
        for i in range(0, len(data), 7):
            whole(self, data[i:i + 7])

    monkeypatch.setattr(splice.FastPath, "data_received", in_pieces)
    data = os.urandom(300_000)
    result = await env.ssh(*env.cert_args(), "--", "cat", stdin=data, timeout=60)
    assert result.returncode == 0 and result.stdout == data
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        process.stdin.write(b"ping")
        assert await asyncio.wait_for(process.stdout.readexactly(6), 5) == b"pong\r\n"
    assert relayed(fast_paths, arriving_from="client") > 0 and relayed(fast_paths, arriving_from="runner") > 0


async def test_a_tampered_packet_ends_the_connection(env: Env, fast_paths: list[splice.FastPath]) -> None:
    """A packet that fails authentication is not relayed: asyncssh drops the connection."""
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        process.stdin.write(b"ping")
        await asyncio.wait_for(process.stdout.readexactly(6), 5)
        client_side = next(p for p in fast_paths if isinstance(p.conn, asyncssh.SSHServerConnection))
        before = client_side.relayed_packets
        forged = (64).to_bytes(4, "big") + os.urandom(64 + 16)  # right shape, wrong key
        client_side.data_received(forged)
        await asyncio.wait_for(conn.wait_closed(), 5)
    assert client_side.relayed_packets == before
    assert not env.gateway.connections


async def test_without_the_state_it_needs_bridges_stay_on_asyncssh(env: Env, fast_paths: list[splice.FastPath],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(splice, "_CONN_STATE", (*splice._CONN_STATE, "_renamed_in_a_future_asyncssh"))
    data = os.urandom(200_000)
    result = await env.ssh(*env.cert_args(), "--", "cat", stdin=data, timeout=30)
    assert result.returncode == 0 and result.stdout == data
    assert relayed(fast_paths) == 0
    assert "fast path off" in caplog.text


async def test_forwarded_tcp_takes_the_fast_path_both_ways(env: Env, fast_paths: list[splice.FastPath],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """ssh -L (VS Code's path into the session): 2 MB through a loopback echo service, exact."""
    caplog.set_level("DEBUG", logger="asyncssh")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    local = free_port()
    remote = service.sockets[0].getsockname()[1]
    argv = [*env.base_args(), *env.cert_args(), "-N", "-o", "ExitOnForwardFailure=yes",
            "-L", f"{local}:127.0.0.1:{remote}", "demo-1@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(80):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                break
            except OSError:
                await asyncio.sleep(0.1)
        data = os.urandom(2 << 20)

        async def send() -> None:
            writer.write(data)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = await asyncio.wait_for(reader.readexactly(len(data)), 30)
        await sender
        writer.close()
        assert got == data
    finally:
        proc.terminate()
        await proc.wait()
        service.close()
        await service.wait_closed()
    assert relayed(fast_paths, arriving_from="client") > 0 and relayed(fast_paths, arriving_from="runner") > 0
    for _ in range(50):
        if not env.gateway.connections:
            break
        await asyncio.sleep(0.1)
    assert all(not p.legs for p in fast_paths)  # both ends of the tunnel let go of it
    assert "Uncaught exception" not in caplog.text


async def test_an_error_on_the_fast_path_closes_only_that_connection(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                                     fast_paths: list[splice.FastPath],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """As asyncssh does with an error while it reads: that connection is closed (logged), the gateway serves on."""
    async with await asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)

        def broken(self: splice.FastPath, chan: Any, data: bytes) -> bool:
            raise RuntimeError("a bug on the fast path")

        monkeypatch.setattr(splice.FastPath, "send_data", broken)
        process.stdin.write(b"ping")
        await asyncio.wait_for(conn.wait_closed(), 5)
    monkeypatch.undo()
    failures = [r for r in caplog.records if r.name == "gateway.splice" and r.levelname == "ERROR"]
    assert failures and "a bug on the fast path" in (failures[0].exc_text or "")
    result = await env.ssh(*env.cert_args(), "--", "echo still here")
    assert result.returncode == 0 and result.stdout == b"still here\n"


async def test_sessions_close_cleanly_whichever_side_ends_first(
        env: Env, fast_paths: list[splice.FastPath], caplog: pytest.LogCaptureFixture) -> None:
    """The runner's side ends first (exec), then the client's; or the client hangs up first (shell)."""
    caplog.set_level("DEBUG", logger="asyncssh")
    async with await asyncssh_client(env) as conn:
        result = await conn.run("echo done", check=False, encoding=None)
        assert result.stdout == b"done\n" and result.exit_status == 0
        process = await conn.create_process(term_type="xterm", encoding=None)
        await asyncio.wait_for(process.stdout.readuntil(b"hi\r\n"), 5)
        process.close()
        await asyncio.wait_for(process.wait_closed(), 5)
    for _ in range(50):
        if not env.gateway.connections:
            break
        await asyncio.sleep(0.1)
    assert all(not p.legs for p in fast_paths)
    assert "Uncaught exception" not in caplog.text
