"""End to end with the REAL runner (runner/main.py: git clone, tmux, its internal SSH endpoint) behind the
gateway, driven by real OpenSSH clients. Only the API is a stand-in (tests/gateway/standins.FakeApi).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gateway.conftest import SESSION, Env, gateway_env, run
from tests.runner.conftest import (  # noqa: F401  (fixtures)
    GatewayKey,
    MakeRepo,
    StartRunner,
    fake_api,
    gateway_key,
    make_repo,
    short_tmp,
    start_runner,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

if not shutil.which("tmux") or not shutil.which("git"):
    pytest.skip("tmux and git are needed for the real runner", allow_module_level=True)

PROGRAM = "bash -c 'echo hi; while read line; do [ \"$line\" = ping ] && echo pong; done'"


@pytest.fixture
async def e2e(tmp_path: Path, make_repo: MakeRepo, start_runner: StartRunner,  # noqa: F811
              gateway_key: GatewayKey) -> AsyncIterator[Env]:  # noqa: F811
    handle = await start_runner(make_repo({"README": "x\n"}), program=PROGRAM, name=SESSION)
    await handle.ready()
    activity = handle.runner.activity
    route = {"host": "127.0.0.1", "port": activity.ssh_port, "host_key": activity.host_key}
    async with gateway_env(tmp_path, client_key=gateway_key.private, route=route) as built:
        built.runner.workspace = Path(handle.spec.workspace)
        yield built


async def test_tty_attach_shows_program_and_answers_ping(e2e: Env) -> None:
    argv = [*e2e.base_args(), "-tt", *e2e.cert_args(), f"{SESSION}@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout
    seen = b""
    try:
        while b"hi" not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 15)
        proc.stdin.write(b"ping\r")
        while b"pong" not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 15)
    finally:
        proc.kill()
        await proc.wait()


async def test_exec_status_and_stderr_through_real_runner(e2e: Env) -> None:
    result = await e2e.ssh(*e2e.cert_args(), "--", "sh -c 'echo out; echo err >&2; exit 3'")
    assert result.returncode == 3, result
    assert result.stdout == b"out\n" and b"err\n" in result.stderr


async def test_sftp_through_real_runner(e2e: Env) -> None:
    data = os.urandom(100_000)
    (e2e.tmp / "up.bin").write_bytes(data)
    batch = e2e.tmp / "batch"
    batch.write_text(f"put {e2e.tmp / 'up.bin'} up.bin\nget up.bin {e2e.tmp / 'back.bin'}\n")
    opts = [a for a in e2e.base_args()[1:] if a not in ("-p", str(e2e.port))] + e2e.cert_args()
    result = await run("sftp", "-P", str(e2e.port), "-b", str(batch), *opts, target=f"{SESSION}@127.0.0.1")
    assert result.returncode == 0, result
    assert (e2e.tmp / "back.bin").read_bytes() == data
    assert (e2e.runner.workspace / "up.bin").read_bytes() == data


async def test_agent_forwarding_only_when_asked(e2e: Env) -> None:
    sock = e2e.tmp / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(sock),
                                                 stdout=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        key = e2e.user_key("agentkey")
        added = await run("ssh-add", str(key), env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        assert added.returncode == 0, added
        fingerprint = (await run("ssh-keygen", "-lf", str(key))).stdout.split()[1]
        # IdentityAgent=none would hide the agent from ssh itself (and cancel -A): point it at ours.
        argv = [*e2e.base_args(identity_agent=str(sock)), "-A", *e2e.cert_args(), f"{SESSION}@127.0.0.1",
                "ssh-add -l"]
        forwarded = await run(*argv)
        assert forwarded.returncode == 0, forwarded
        assert fingerprint in forwarded.stdout
        plain = await e2e.ssh(*e2e.cert_args(), "--", "ssh-add -l")
        assert plain.returncode != 0 and fingerprint not in plain.stdout
        # Without -A the session has no agent socket at all (not one whose use fails with
        # "communication with agent failed"); the runner builds one environment for commands and the pty.
        unset = await e2e.ssh(*e2e.cert_args(), "--", 'echo "agent=${SSH_AUTH_SOCK-unset}"')
        assert unset.stdout == b"agent=unset\n", unset
        with_a = await run(*[*e2e.base_args(identity_agent=str(sock)), "-A", *e2e.cert_args(),
                             f"{SESSION}@127.0.0.1", 'echo "agent=${SSH_AUTH_SOCK-unset}"'])
        assert with_a.stdout.startswith(b"agent=/"), with_a
    finally:
        agent.kill()
        await agent.wait()
