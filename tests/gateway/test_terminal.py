"""Terminal behaviour through the gateway: resize, read-only attach, exit signals."""

from __future__ import annotations

import asyncio

import asyncssh
import pexpect

from tests.gateway.conftest import Env


def _interactive_resize(argv: list[str]) -> str:
    """Drive ssh in a real pty (pexpect), resize the terminal, collect what the session printed."""
    child = pexpect.spawn(argv[0], argv[1:], dimensions=(24, 80), timeout=10)
    try:
        child.expect("hi")
        child.setwinsize(40, 132)
        child.expect(r"size 132x40")
        child.sendline("ping")
        child.expect("pong")
        return child.before.decode(errors="replace")
    finally:
        child.close(force=True)


async def test_resize_reaches_the_session(env: Env) -> None:
    argv = [*env.base_args(), "-t", *env.cert_args(), "demo-1@127.0.0.1"]
    await asyncio.to_thread(_interactive_resize, argv)
    assert (132, 40) in env.runner.term_sizes


async def test_readonly_attach_cannot_type_or_run(env: Env) -> None:
    cert = env.certificate(readonly=True, name="ro")
    result = await env.ssh("-tt", *env.cert_args(cert, name="ro"), stdin=b"ping\n")
    assert b"hi (read-only)" in result.stdout and b"pong" not in result.stdout
    assert env.runner.usernames == ["ro"]
    assert env.api.authorize_calls[-1]["readonly"] is True
    exec_result = await env.ssh(*env.cert_args(cert, name="ro"), "--", "echo in")
    assert exec_result.returncode != 0 and exec_result.stdout == b""
    # Not ssh's bare "exec request failed on channel 0": the reason, as for any other refusal.
    assert b"orz: this attach is read-only" in exec_result.stderr, exec_result.stderr
    assert env.runner.usernames == ["ro"]  # the refused command opened nothing on the runner
    sftp = await env.ssh(*env.cert_args(cert, name="ro"), "-s", "--", "sftp")
    assert sftp.returncode != 0 and b"orz: this attach is read-only" in sftp.stderr, sftp.stderr
    assert env.runner.usernames == ["ro"]


async def _asyncssh_client(env: Env) -> asyncssh.SSHClientConnection:
    key = asyncssh.read_private_key(env.user_key())
    cert = asyncssh.read_certificate(env.certificate())
    return await asyncssh.connect("127.0.0.1", env.port, username="demo-1", client_keys=[(key, cert)],
                                  known_hosts=str(env.known_hosts), config=None, agent_path=None)


async def test_exit_signal_passed_through(env: Env) -> None:
    async with await _asyncssh_client(env) as conn:
        result = await conn.run("kill -TERM $$", check=False)
    assert result.exit_signal is not None and result.exit_signal[0] == "TERM"
    assert result.exit_status == -1


async def test_signal_and_break_reach_the_session(env: Env) -> None:
    async with await _asyncssh_client(env) as conn:
        process = await conn.create_process(term_type="xterm", encoding=None)
        assert await asyncio.wait_for(process.stdout.readuntil(b"hi"), 5)
        process.send_signal("INT")
        process.channel.send_break(100)
        process.stdin.write(b"ping\n")
        assert await asyncio.wait_for(process.stdout.readuntil(b"pong"), 5)
        process.stdin.write_eof()
        await asyncio.wait_for(process.wait_closed(), 5)
    assert env.runner.signals == ["INT", "break"]
