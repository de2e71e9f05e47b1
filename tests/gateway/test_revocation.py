"""Withdrawn access ends live attachments: each channel open asks the API again, and every gateway's
access watch cuts connections of disabled users and deleted sessions (gateway/revocation.py).
Real OpenSSH clients through a real gateway; the API and runner are the stand-ins of standins.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gateway.conftest import SESSION, USER, Env, browser_terminal, eventually, gateway_env
from tests.gateway.standins import FakeSession


async def test_a_new_channel_on_a_live_connection_is_reauthorized(tmp_path: Path) -> None:
    """ControlMaster: the second exec rides the first connection, and is refused once the user is disabled."""
    # No access watch in this test (an hour apart): only the channel-open check can refuse.
    async with gateway_env(tmp_path, gateway_access_check_s=60) as env:
        control = tmp_path / "ctl"
        mux = ["-S", str(control), "-o", "ControlMaster=no"]
        master = await asyncio.create_subprocess_exec(
            *env.base_args(), *env.cert_args(), "-M", "-S", str(control), "-N", f"{SESSION}@127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await eventually(control.exists, "the control socket")
            first = await env.ssh(*mux, "--", "echo first")
            assert first.returncode == 0 and first.stdout == b"first\n", first
            env.api.disabled_users.add(USER)
            second = await env.ssh(*mux, "--", "echo second")
            assert second.returncode != 0 and b"second" not in second.stdout
            assert b"orz: your account is disabled" in second.stderr, second.stderr
            # The whole connection goes with it: the master exits.
            await asyncio.wait_for(master.wait(), 10)
        finally:
            if master.returncode is None:
                master.kill()
                await master.wait()


@contextlib.asynccontextmanager
async def control_master(env: Env, tmp_path: Path) -> AsyncIterator[tuple[list[str], asyncio.subprocess.Process]]:
    """An `ssh -M -N` connection; yields the options that run more commands over it, and its process."""
    control = tmp_path / "ctl"
    master = await asyncio.create_subprocess_exec(
        *env.base_args(), *env.cert_args(), "-M", "-S", str(control), "-N", f"{SESSION}@127.0.0.1",
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await eventually(control.exists, "the control socket")
        yield ["-S", str(control), "-o", "ControlMaster=no"], master
    finally:
        if master.returncode is None:
            master.kill()
            await master.wait()


@pytest.mark.parametrize("grace_s", [300, 0])
async def test_new_channels_while_the_api_restarts_pass_within_the_grace(tmp_path: Path, grace_s: int) -> None:
    """The API answers 503 (restarting): a live connection's next exec runs on its last yes, for
    ORZ_GATEWAY_REAUTH_GRACE_S; with 0 it is refused with a line saying why, and the connection stays."""
    async with (gateway_env(tmp_path, gateway_access_check_s=60, gateway_reauth_grace_s=grace_s) as env,
                control_master(env, tmp_path) as (mux, master)):
        first = await env.ssh(*mux, "--", "echo first")
        assert first.returncode == 0 and first.stdout == b"first\n", first
        env.api.authorize_outage = 503
        second = await env.ssh(*mux, "--", "echo second")
        if grace_s:
            assert second.returncode == 0 and second.stdout == b"second\n", second
        else:
            assert second.returncode != 0 and b"second" not in second.stdout
            assert b"orz: Orzbob Cloud is unavailable right now; try again shortly" in second.stderr, second.stderr
        env.api.authorize_outage = None
        third = await env.ssh(*mux, "--", "echo third")  # not a revocation: the API's yes works again
        assert third.returncode == 0 and third.stdout == b"third\n", third
        assert master.returncode is None


async def test_a_revocation_ends_the_connection_within_the_grace(tmp_path: Path) -> None:
    """Authorize calls fail (503) but the access watch hears that the user was disabled: the grace does not
    keep the connection."""
    async with (gateway_env(tmp_path, gateway_access_check_s=0.2) as env,
                control_master(env, tmp_path) as (mux, master)):
        first = await env.ssh(*mux, "--", "echo first")
        assert first.returncode == 0, first
        env.api.authorize_outage = 503
        env.api.disabled_users.add(USER)
        await asyncio.wait_for(master.wait(), 10)
        after = await env.ssh(*mux, "--", "echo after")
        assert after.returncode != 0 and b"after" not in after.stdout


async def _attach(env: Env, session: str, cert: Path, name: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *env.base_args(), "-tt", *env.cert_args(cert, name=name), f"{session}@127.0.0.1",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readuntil(b"hi\r\n"), 15)
    return proc


@pytest.mark.parametrize("withdraw", ["disable-user", "delete-session"])
async def test_live_pty_ends_with_the_reason_and_others_stay(tmp_path: Path, withdraw: str) -> None:
    async with gateway_env(tmp_path, gateway_access_check_s=0.2) as env:
        env.api.sessions["demo-2"] = FakeSession(owner="usr_bob", route=env.runner.route)
        alice = await _attach(env, SESSION, env.certificate(), "id")
        bob = await _attach(env, "demo-2", env.certificate("demo-2", "usr_bob", name="bob"), "bob")
        try:
            if withdraw == "disable-user":
                env.api.disabled_users.add(USER)
                reason = b"orz: your account is disabled"
            else:
                del env.api.sessions[SESSION]
                reason = b"orz: session demo-1 was deleted"
            assert alice.stdout is not None and bob.stdin is not None and bob.stdout is not None
            shown = await asyncio.wait_for(alice.stdout.read(), 10)  # to the end: the client was cut
            assert reason in shown, shown
            assert await asyncio.wait_for(alice.wait(), 10) != 0
            # Bob, on the same gateway, types on.
            bob.stdin.write(b"ping\r")
            assert b"pong" in await asyncio.wait_for(bob.stdout.readuntil(b"pong"), 10)
            assert bob.returncode is None
        finally:
            for proc in (alice, bob):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
    assert env.api.access_checks > 0


async def test_a_browser_terminal_ends_with_the_reason(tmp_path: Path) -> None:
    async with gateway_env(tmp_path, gateway_access_check_s=0.2) as env, browser_terminal(env) as term:
        await term.until(b"hi")
        env.api.disabled_users.add(USER)
        await term.until_closed()
        assert {"type": "error", "message": "your account is disabled"} in term.control
        assert term.ws.close_code == 4001 and term.ws.close_reason == "your account is disabled"
