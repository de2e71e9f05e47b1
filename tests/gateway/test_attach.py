"""The attach path with real OpenSSH clients: shell with a pty, exec, and the credentials accepted."""

from __future__ import annotations

import asyncio
import os
import pwd
from pathlib import Path

import pytest

from gateway import bridge
from tests.gateway.conftest import SESSION, USER, Env, eventually, gateway_env


async def test_tty_shell_shows_program_output(env: Env) -> None:
    result = await env.ssh("-tt", *env.cert_args(), stdin=b"ping\n")
    assert b"hi" in result.stdout, result
    assert b"pong" in result.stdout
    kinds = [e["event"] for e in env.api.events]
    assert kinds[0] == "attached"
    await asyncio.sleep(0.3)
    assert [e["event"] for e in env.api.events] == ["attached", "detached"]
    assert env.api.events[1]["bytes_out"] > 0 and env.api.events[1]["user_id"] == USER


async def test_exec_exit_status_and_streams_apart(env: Env) -> None:
    result = await env.ssh(*env.cert_args(), "--", "sh -c 'echo out; echo err >&2; exit 3'")
    assert result.returncode == 3
    assert result.stdout == b"out\n"
    assert b"err\n" in result.stderr and b"out" not in result.stderr


async def test_exec_stdin_and_binary_roundtrip(env: Env) -> None:
    payload = bytes(range(256)) * 1000
    result = await env.ssh(*env.cert_args(), "--", "cat", stdin=payload)
    assert result.returncode == 0 and result.stdout == payload


async def test_jwt_as_password(env: Env) -> None:
    result = await env.ssh(*env.token_args(), "--", "echo via-jwt", env=env.password_env(env.token()))
    assert result.returncode == 0, result
    assert result.stdout == b"via-jwt\n"
    call = env.api.authorize_calls[0]
    assert call["method"] == "jwt" and call["jti"] and call["user_id"] == USER
    # The session channel was re-authorized without replaying the single-use token.
    assert len(env.api.authorize_calls) == 2 and env.api.authorize_calls[1].get("jti") is None


async def test_jwt_as_keyboard_interactive(env: Env) -> None:
    result = await env.ssh(*env.token_args("keyboard-interactive"), "--", "echo kbd",
                           env=env.password_env(env.token()))
    assert result.returncode == 0 and result.stdout == b"kbd\n", result


async def test_stopped_session_wakes_with_progress(env: Env) -> None:
    env.api.sessions[SESSION].state = "stopped"
    env.api.sessions[SESSION].wake_polls = 2
    result = await env.ssh(*env.cert_args(), "--", "echo awake")
    assert result.returncode == 0, result
    assert result.stdout == b"awake\n"
    assert f"session {SESSION} is starting".encode() in result.stderr
    # Progress is not an error: it reads like the runner's "[orz] the session is starting...".
    progress = [line for line in result.stderr.splitlines() if b"is starting" in line or b"is stopped" in line]
    assert progress and all(line.startswith(b"[orz] session ") for line in progress), result.stderr
    assert b"orz: " not in result.stderr
    assert env.api.authorize_calls[-1].get("jti") is None  # polls never replay a token


async def test_a_session_the_reaper_is_stopping_as_the_user_arrives_is_woken(env: Env) -> None:
    """The soak's `ssh host cmd` that failed: the first authorize finds the session stopping (idle), the
    exec channel's re-authorization finds it stopped. The channel waits for the attach to wake it."""
    env.api.sessions[SESSION].state = "stopping"
    env.api.sessions[SESSION].stopping_calls = 1
    env.api.sessions[SESSION].wake_polls = 2
    result = await env.ssh(*env.cert_args(), "--", "echo still here")
    assert result.returncode == 0, result
    assert result.stdout == b"still here\n"
    assert b"orz: " not in result.stderr


async def test_attach_works_for_a_uid_without_a_passwd_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenShift runs a container as an arbitrary uid that passwd does not know, and the chart lets an operator
    pick runAsUser: the gateway's internal connection must not need a user name from passwd (asyncssh asks
    for one on every connect, and refused each attach)."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(name, "x")  # recorded, so the teardown puts back what was there before
        monkeypatch.delenv(name)

    def unknown_uid(uid: int) -> pwd.struct_passwd:  # stands in for a passwd without this uid
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown_uid)
    async with gateway_env(tmp_path) as env:
        assert os.environ["LOGNAME"] == bridge.FALLBACK_LOCAL_USER
        result = await env.ssh(*env.cert_args(), "--", "echo awake")
        assert (result.returncode, result.stdout) == (0, b"awake\n"), result.stderr



async def test_a_connection_whose_session_stops_is_told_why_and_how_to_come_back(env: Env) -> None:
    """`orz cloud stop` (or the idle reaper) under a tunnel (`ssh -N -L`, `ssh -D`, VS Code's forwarding):
    ssh's last line names the session and how to come back, not a bare "Disconnected by application"."""
    tunnel = await asyncio.create_subprocess_exec(
        *env.base_args(), "-N", *env.cert_args(), f"{SESSION}@127.0.0.1",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await eventually(lambda: any(c.attached_at is not None for c in env.gateway.connections), "the tunnel to attach")
    env.runner.drop_connections()  # the session's runner goes away, as on a stop
    _, err = await asyncio.wait_for(tunnel.communicate(), 10)
    assert tunnel.returncode == 255
    assert b"Disconnected by application" not in err
    assert (f"orz: session {SESSION} ended this connection (stopped, killed or its runner restarted: orz cloud "
            f"status {SESSION} says which); connecting again wakes a stopped session").encode() in err, err
