"""Real OpenSSH clients (ssh, scp, scp -O, ssh-agent) against the internal endpoint, as the gateway would
bridge them: the gateway key, user "rw", the host key pinned from the heartbeat."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.runner.conftest import MakeRepo, RunningRunner, StartRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
async def session(make_repo: MakeRepo, start_runner: StartRunner) -> RunningRunner:
    handle = await start_runner(make_repo({"README": "x\n"}))
    await handle.ready()
    return handle


def ssh_options(handle: RunningRunner, tmp: Path) -> list[str]:
    key = tmp / "gw_key"
    if not key.exists():
        key.write_bytes(handle.gateway.private.export_private_key("openssh"))
        key.chmod(0o600)
    known = tmp / "known_hosts"
    known.write_text(f"[127.0.0.1]:{handle.runner.activity.ssh_port} {handle.runner.activity.host_key}\n")
    return ["-i", str(key), "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]


async def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                stdin=subprocess.DEVNULL, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)


async def test_openssh_exec_scp_and_legacy_scp(session: RunningRunner, short_tmp: Path) -> None:
    opts = ssh_options(session, short_tmp)
    port = str(session.runner.activity.ssh_port)
    result = await run("ssh", *opts, "-p", port, "rw@127.0.0.1", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")

    local = short_tmp / "f.txt"
    local.write_text("scp payload\n")
    for mode, name in ((), "via-sftp.txt"), (("-O",), "via-legacy.txt"):
        up = await run("scp", *opts, *mode, "-P", port, str(local), f"rw@127.0.0.1:{name}")
        assert up.returncode == 0, up.stderr
        assert (session.runner.workspace / name).read_text() == "scp payload\n"
        back = short_tmp / f"back-{name}"
        down = await run("scp", *opts, *mode, "-P", port, f"rw@127.0.0.1:{name}", str(back))
        assert down.returncode == 0, down.stderr
        assert back.read_text() == "scp payload\n"

    refused = await run("scp", *opts, "-P", port, str(local), "ro@127.0.0.1:nope.txt")
    assert refused.returncode != 0 and not (session.runner.workspace / "nope.txt").exists()


async def test_agent_forwarding_when_the_client_asks(session: RunningRunner, short_tmp: Path) -> None:
    opts = ssh_options(session, short_tmp)
    agent_sock = short_tmp / "agent.sock"
    started = await run("ssh-agent", "-a", str(agent_sock))
    pid = int(started.stdout.split(b"SSH_AGENT_PID=")[1].split(b";")[0])
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        assert (await run("ssh-add", str(short_tmp / "gw_key"), env=env)).returncode == 0
        port = str(session.runner.activity.ssh_port)
        forwarded = await run("ssh", *opts, "-A", "-p", port, "rw@127.0.0.1", "ssh-add -l", env=env)
        assert forwarded.returncode == 0, forwarded.stderr
        assert b"ED25519" in forwarded.stdout
        plain = await run("ssh", *opts, "-a", "-p", port, "rw@127.0.0.1", "ssh-add -l", env=env)
        assert plain.returncode != 0
    finally:
        os.kill(pid, signal.SIGTERM)


async def test_endpoint_sends_no_ignore_filler(session: RunningRunner, short_tmp: Path) -> None:
    """With AES-GCM the endpoint leaves out the empty IGNORE packet asyncssh puts before every packet (half
    the packets per keystroke echo, for it and the gateway's fast path)."""
    opts = ssh_options(session, short_tmp)
    port = str(session.runner.activity.ssh_port)
    result = await run("ssh", *opts, "-vvv", "-o", "Ciphers=aes128-gcm@openssh.com", "-p", port, "rw@127.0.0.1",
                       "echo one; echo two")
    assert (result.returncode, result.stdout) == (0, b"one\ntwo\n"), result.stderr[-500:]
    log = result.stderr.decode()
    assert "aes128-gcm@openssh.com" in log and "SSH2_MSG_IGNORE" not in log


async def test_sftp_lists_the_workspace_and_home_laid_out_as_providers_do(
        make_repo: MakeRepo, start_runner: StartRunner, short_tmp: Path) -> None:
    """The local provider and the chart put the home beside the workspace, never above it, so the `..` of
    either is outside what SFTP may reach: `ls` of them must still list their files (it failed whole)."""
    home = short_tmp / "s1" / "home"
    home.mkdir(parents=True)
    (home / ".profile").write_text("# home\n")
    handle = await start_runner(make_repo({"README": "x\n"}), extra_env={"HOME": str(home)})
    await handle.ready()
    opts = ssh_options(handle, short_tmp)
    port = str(handle.runner.activity.ssh_port)
    batch = short_tmp / "batch"
    batch.write_text(f"ls -la\nls -la {home}\nls /etc\n")
    result = await run("sftp", *opts, "-P", port, "-b", str(batch), "rw@127.0.0.1")
    out = result.stdout.decode()
    assert "README" in out and ".profile" in out, (out, result.stderr)
    # each listing has its `..` line (the workspace's and the home's stand for themselves; sftp names the
    # second by its path, as against sftp-server); /etc stays refused
    assert [line.split()[-1] for line in out.splitlines() if line.endswith("..")] == ["..", f"{home}/.."], out
    assert result.returncode != 0 and b"/etc" in result.stderr
