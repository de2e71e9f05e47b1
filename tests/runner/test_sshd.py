"""The internal SSH endpoint, driven by an asyncssh client playing the gateway (real tmux, real pty)."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from runner.sshd import client_env, is_loopback
from tests.runner.conftest import MakeRepo, StartRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

CONFIG = 'version: "1.0"\nsetup:\n  onAttach: echo welcome-from-onattach\n'


async def read_until(stdout: asyncssh.SSHReader, needle: bytes, timeout: float = 8.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not seen; got {seen[-500:]!r}")
        try:
            seen += await asyncio.wait_for(stdout.read(65536), remaining)
        except TimeoutError:
            continue
    return seen


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses with a listening TCP socket on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


@pytest.fixture
async def session(make_repo: MakeRepo, start_runner: StartRunner):
    handle = await start_runner(make_repo({".orz/cloud.yaml": CONFIG, "README": "x\n"}))
    await handle.ready()
    return handle


async def test_pty_shell_sees_program_output_and_typing_echoes(session) -> None:
    async with await session.connect() as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30))
        seen = await read_until(proc.stdout, b"welcome-from-onattach")
        seen += await read_until(proc.stdout, b"hi")
        proc.stdin.write(b"echo ping\r")
        await read_until(proc.stdout, b"ping")
        assert session.runner.activity.last_input_at is not None
        # the input went to the program in tmux, not to a side shell
        await asyncio.sleep(0.3)
        assert "ping" in await session.runner.tmux.capture()
        proc.change_terminal_size(120, 40)
        for _ in range(50):
            sizes = await session.runner.tmux.run("list-clients", "-F", "#{client_width}x#{client_height}")
            if "120x40" in sizes:
                break
            await asyncio.sleep(0.1)
        assert "120x40" in sizes
        proc.close()


async def test_keys_typed_before_tmux_attaches_are_not_lost(make_repo: MakeRepo, start_runner: StartRunner) -> None:
    handle = await start_runner(make_repo({"README": "x\n"}), program="bash")
    await handle.ready()
    async with await handle.connect() as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30))
        proc.stdin.write(b"echo typed-''ahead\r")  # at once: tmux is not attached yet
        await read_until(proc.stdout, b"typed-ahead")
        proc.close()


async def test_exec_keeps_exit_status_and_stderr_apart(session) -> None:
    async with await session.connect() as conn:
        result = await conn.run("echo out; echo err >&2; pwd; exit 7", check=False)
        assert result.exit_status == 7
        assert result.stdout.splitlines() == [b"out", session.spec.workspace.encode()]
        assert result.stderr == b"err\n"
        killed = await conn.run("kill -TERM $$", check=False)
        assert killed.exit_signal is not None and killed.exit_signal[0] == "TERM"
        piped = await conn.run("cat; echo done", input=b"from-stdin\n", check=False)
        assert piped.stdout == b"from-stdin\ndone\n"
        in_pty = await conn.run("tty", term_type="xterm", check=False)
        assert in_pty.exit_status == 0 and b"/dev/pts/" in in_pty.stdout


@pytest.mark.parametrize("term_type", [None, "xterm"])
async def test_a_cancelled_exec_leaves_no_process_behind(session, term_type: str | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner stopping cancels exec handlers: each command is killed and reaped before its handler ends
    (no zombie, no "subprocess is still running" warning once the loop closes)."""
    made: list[asyncio.subprocess.Process] = []
    spawn = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        made.append(await spawn(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    async with await session.connect() as conn:
        command = await conn.create_process("echo $$; exec sleep 30", term_type=term_type)
        pid = int((await command.stdout.readline()).strip())
        [proc] = [p for p in made if p.pid == pid]
        [handler] = [task for task in asyncio.all_tasks()
                     if getattr(task.get_coro(), "__qualname__", "") == "Endpoint._handle"]
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        # Its exit status was collected before the cancellation went on: not running, not a zombie.
        assert proc.returncode == -signal.SIGKILL
        assert not Path(f"/proc/{pid}").exists()
        command.close()


async def test_big_output_through_a_pty_arrives_whole(session) -> None:
    async with await session.connect() as conn:
        # ~4 MB through the pty: reading pauses while the client lags, and nothing is lost
        result = await conn.run("head -c 3000000 /dev/zero | base64 -w 0; echo; echo END",
                                term_type="dumb", check=False)
        assert result.exit_status == 0
        body = result.stdout.replace(b"\r\n", b"\n")
        assert body.endswith(b"\nEND\n") and body.count(b"A") == 4000000


async def test_streamed_pty_output_keeps_its_order(session) -> None:
    """A streaming program's output is read from the pty in batches (runner/ptyproc.py): every line
    arrives once, in order."""
    async with await session.connect() as conn:
        result = await conn.run("seq 1 300000", term_type="dumb", check=False)
        assert result.exit_status == 0
        assert result.stdout.replace(b"\r\n", b"\n") == b"".join(b"%d\n" % i for i in range(1, 300001))


async def test_sftp_put_get_round_trip(session, short_tmp) -> None:
    local = short_tmp / "up.bin"
    payload = bytes(range(256)) * 1000
    local.write_bytes(payload)
    async with await session.connect() as conn, conn.start_sftp_client() as sftp:
        await sftp.put(str(local), "uploaded.bin")
        assert (session.runner.workspace / "uploaded.bin").read_bytes() == payload
        back = short_tmp / "down.bin"
        await sftp.get("uploaded.bin", str(back))
        assert back.read_bytes() == payload
        assert "README" in await sftp.listdir(".")
        # the paths an exec sees (it starts in the workspace); outside the workspace and home, nothing
        assert await sftp.realpath(".") == str(session.runner.workspace)
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.listdir("/etc")


async def test_direct_tcpip_only_to_loopback(session) -> None:
    listener = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
        "print(s.getsockname()[1], flush=True); c, _ = s.accept(); c.sendall(b'pong-from-session'); c.close()"
    )
    async with await session.connect() as conn:
        server = await conn.create_process(f"python3 -c \"{listener}\"")
        port = int((await server.stdout.readline()).strip())
        reader, writer = await conn.open_connection("127.0.0.1", port)
        assert await reader.read() == b"pong-from-session"
        writer.close()
        await server.wait()
        for host in ("10.255.255.1", "example.com", "0.0.0.0"):
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection(host, 80)


async def test_remote_forward_listens_on_loopback(session) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"via-R:" + await reader.readline())
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    try:
        async with await session.connect() as conn:
            listener = await conn.forward_remote_port("", 0, "127.0.0.1", target_port)
            port = listener.get_port()
            # asked for "all interfaces", bound on loopback only
            assert listening_addresses(port) == {"127.0.0.1"}
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello\n")
            assert await reader.read() == b"via-R:hello\n"
            writer.close()
            listener.close()
    finally:
        target.close()


async def test_readonly_user_cannot_type(session) -> None:
    async with await session.connect("ro") as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30))
        await read_until(proc.stdout, b"hi")
        proc.stdin.write(b"echo typed-by-ro\r")
        await asyncio.sleep(1.0)
        assert "typed-by-ro" not in await session.runner.tmux.capture()
        result = await conn.run("id", check=False)
        assert result.exit_status == 1 and b"read-only" in result.stderr
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", session.runner.activity.ssh_port)
        proc.close()


async def test_only_the_gateway_key_and_modes_get_in(session) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        await session.connect("rw", key=stranger)
    with pytest.raises(asyncssh.PermissionDenied):
        await session.connect("root")
    assert session.runner.activity.connections == 0
    async with await session.connect("rw"):
        assert session.runner.activity.connections == 1


def test_loopback_and_env_policies() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "0.0.0.0", "::", "example.com", "127.0.0.1.nip.io"))
    assert client_env({"TERM": "xterm", "LANG": "C", "LC_ALL": "C", "PATH": "/evil", "LD_PRELOAD": "x"}) == {
        "TERM": "xterm", "LANG": "C", "LC_ALL": "C"}
