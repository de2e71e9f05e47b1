"""Automation clients as their users use them (issue 25): OpenSSH ssh/scp/sftp/rsync and paramiko against the
runner's endpoint and, where the behaviour is meant to be the same, against a stock OpenSSH sshd."""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from bench.gateway import SSHD, Sshd
from tests.runner.conftest import GatewayKey, MakeRepo, StartRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HAS_SSHD = Path(SSHD).exists()


@dataclass
class Host:
    """One SSH server as OpenSSH clients and paramiko reach it: the runner's endpoint or a stock sshd."""

    name: str
    port: int
    user: str
    key: Path
    known_hosts: Path

    @property
    def dest(self) -> str:
        return f"{self.user}@127.0.0.1"

    def ssh_options(self) -> list[str]:
        return ["-F", "/dev/null", "-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]

    def ssh(self, *args: str) -> list[str]:
        return ["ssh", *self.ssh_options(), "-p", str(self.port), *args]

    def scp(self, *args: str) -> list[str]:
        return ["scp", *self.ssh_options(), "-P", str(self.port), *args]

    def paramiko(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect("127.0.0.1", self.port, username=self.user, key_filename=str(self.key),
                       allow_agent=False, look_for_keys=False, timeout=10)
        return client


def write_key(gateway: GatewayKey, tmp: Path) -> Path:
    key = tmp / "client_key"
    if not key.exists():
        key.write_bytes(gateway.private.export_private_key("openssh"))
        key.chmod(0o600)
    return key


@pytest.fixture
async def orz(make_repo: MakeRepo, start_runner: StartRunner, short_tmp: Path) -> Host:
    handle = await start_runner(make_repo({"README": "x\n"}))
    await handle.ready()
    activity = handle.runner.activity
    assert activity.ssh_port and activity.host_key
    known = short_tmp / "known_orz"
    known.write_text(f"[127.0.0.1]:{activity.ssh_port} {activity.host_key}\n")
    return Host("orz", activity.ssh_port, "rw", write_key(handle.gateway, short_tmp), known)


@pytest.fixture
def stock_sshd(gateway_key: GatewayKey, short_tmp: Path) -> Iterator[Host]:
    if not HAS_SSHD:
        pytest.skip("sshd not installed (openssh-server)")
    work = short_tmp / "sshd"
    work.mkdir()
    # The policy the comparison needs: forwarding to loopback only, as the runner allows.
    server = Sshd(work, [gateway_key.public], extra_config=("PermitOpen 127.0.0.1:* localhost:*",))
    known = short_tmp / "known_sshd"
    known.write_text(f"[127.0.0.1]:{server.port} {server.host_key.export_public_key().decode().strip()}\n")
    try:
        yield Host("sshd", server.port, getpass.getuser(), write_key(gateway_key, short_tmp), known)
    finally:
        server.stop()


@pytest.fixture(params=["orz", "sshd"])
def host(request: pytest.FixtureRequest) -> Host:
    return request.getfixturevalue("orz" if request.param == "orz" else "stock_sshd")


async def run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                stdin=subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)


async def remote(host: Host, command: str) -> str:
    result = await run(host.ssh(host.dest, command))
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


# -- item 3: end of input is not a hang-up --------------------------------------------------------------


async def test_pty_command_runs_on_after_stdin_reaches_eof(host: Host) -> None:
    for _ in range(3):
        result = await run(host.ssh("-n", "-tt", host.dest, "sleep 0.2; echo x"))
        assert (result.returncode, result.stdout.replace(b"\r\n", b"\n")) == (0, b"x\n"), result.stderr

    def with_paramiko() -> tuple[bytes, int]:
        with host.paramiko() as client:
            stdin, stdout, _ = client.exec_command("sleep 0.2; echo from-pty; exit 4", get_pty=True)
            stdin.close()  # EOF on the channel
            return stdout.read(), stdout.channel.recv_exit_status()

    out, status = await asyncio.to_thread(with_paramiko)
    assert (out, status) == (b"from-pty\r\n", 4)


# -- item 1: one view of paths ---------------------------------------------------------------------------


async def test_the_path_pwd_prints_works_in_scp_sftp_and_legacy_scp(host: Host, short_tmp: Path) -> None:
    cwd = await remote(host, "pwd")
    home = await remote(host, "echo ~")
    local = short_tmp / "payload.txt"
    local.write_text("payload\n")
    name = f"orz-paths-{os.getpid()}"
    try:
        for mode, suffix in (((), "sftp"), (("-O",), "legacy")):
            target = f"{cwd}/{name}-{suffix}"
            up = await run(host.scp(*mode, str(local), f"{host.dest}:{target}"))
            assert up.returncode == 0, up.stderr
            assert Path(target).read_text() == "payload\n"
            back = short_tmp / f"back-{suffix}"
            down = await run(host.scp(*mode, f"{host.dest}:{target}", str(back)))
            assert down.returncode == 0, down.stderr
            assert back.read_text() == "payload\n"

        def with_paramiko() -> tuple[str, str]:
            with host.paramiko() as client, client.open_sftp() as sftp:
                here = sftp.normalize(".")
                sftp.put(str(local), f"{home}/{name}-home")
                sftp.put(str(local), f"{cwd}/{name}-abs")
                return here, sftp.open(f"{cwd}/{name}-abs").read().decode()

        # Legacy scp hands the path to the server as sshd's shell would see it: ~ is the home.
        tilde = await run(host.scp("-O", str(local), f"{host.dest}:~/{name}-tilde"))
        assert tilde.returncode == 0, tilde.stderr
        assert Path(home, f"{name}-tilde").read_text() == "payload\n"

        here, text = await asyncio.to_thread(with_paramiko)
        assert (here, text) == (cwd, "payload\n")
        assert Path(home, f"{name}-home").read_text() == "payload\n"
        assert await remote(host, f"cat {name}-abs") == "payload"
    finally:
        for path in {*Path(cwd).glob(f"{name}-*"), *Path(home).glob(f"{name}-*")}:
            path.unlink(missing_ok=True)


async def test_scp_in_sftp_mode_takes_the_login_names_home(make_repo: MakeRepo, start_runner: StartRunner,
                                                          short_tmp: Path) -> None:
    """`scp f <id>@gateway:~<id>/x` (docs/automation.md): OpenSSH's scp asks the server to expand a `~user`
    path (expand-path@openssh.com) and, without that extension, refuses it before sending anything."""
    handle = await start_runner(make_repo({"README": "x\n"}), name="s8")
    await handle.ready()
    activity = handle.runner.activity
    assert activity.ssh_port and activity.host_key
    known = short_tmp / "known_s8"
    known.write_text(f"[127.0.0.1]:{activity.ssh_port} {activity.host_key}\n")
    orz = Host("orz", activity.ssh_port, "rw", write_key(handle.gateway, short_tmp), known)
    home = await remote(orz, "echo ~")
    local = short_tmp / "payload.txt"
    local.write_text("payload\n")
    up = await run(orz.scp(str(local), f"{orz.dest}:~s8/by-login.txt"))
    assert up.returncode == 0, up.stderr
    assert Path(home, "by-login.txt").read_text() == "payload\n"
    down = await run(orz.scp(f"{orz.dest}:~s8/by-login.txt", str(short_tmp / "back.txt")))
    assert down.returncode == 0, down.stderr
    assert (short_tmp / "back.txt").read_text() == "payload\n"
    # Expanding a path reaches no further than the rest of sftp: the home's parent stays out of reach.
    refused = await run(orz.scp(str(local), f"{orz.dest}:~s8/../escaped.txt"))
    assert refused.returncode != 0 and not Path(home).parent.joinpath("escaped.txt").exists()
    assert not list(handle.runner.workspace.glob("~*"))


async def test_sftp_and_scp_stay_inside_the_workspace_and_home(orz: Host, short_tmp: Path) -> None:
    local = short_tmp / "payload.txt"
    local.write_text("payload\n")
    for mode in ((), ("-O",)):
        refused = await run(orz.scp(*mode, f"{orz.dest}:/etc/hostname", str(short_tmp / "stolen")))
        assert refused.returncode != 0 and not (short_tmp / "stolen").exists()
        refused = await run(orz.scp(*mode, str(local), f"{orz.dest}:/var/tmp/orz-nope"))
        assert refused.returncode != 0 and not Path("/var/tmp/orz-nope").exists()
    cwd = await remote(orz, "pwd")

    def with_paramiko() -> list[str]:
        errors = []
        with orz.paramiko() as client, client.open_sftp() as sftp:
            for path in ("/etc/hostname", f"{cwd}/../../../../etc/hostname", "/"):
                try:
                    sftp.stat(path)
                except PermissionError as exc:
                    errors.append(str(exc))
            # "~" and the login name are the home, as a shell would expand them.
            sftp.put(str(local), "~/tilde.txt")
        return errors

    errors = await asyncio.to_thread(with_paramiko)
    assert len(errors) == 3 and "outside the session's workspace and home" in errors[0]
    assert (Path(await remote(orz, "echo $HOME")) / "tilde.txt").read_text() == "payload\n"


async def test_the_login_name_expands_to_the_home_in_commands(make_repo: MakeRepo, start_runner: StartRunner,
                                                              short_tmp: Path) -> None:
    """Ansible asks `echo ~<remote user>`: with the session id as user, the answer is the home, and
    nothing named `~<id>` appears in the git workspace."""
    handle = await start_runner(make_repo({"README": "x\n"}), name="s7")
    await handle.ready()
    async with await handle.connect() as conn:
        result = await conn.run("/bin/sh -c 'echo ~s7 && sleep 0'; mkdir -p \"` echo ~s7/.ansible/tmp `\"",
                                check=False)
        assert result.exit_status == 0, result.stderr
        assert result.stdout.decode().strip() == str(short_tmp)
    assert (short_tmp / ".ansible" / "tmp").is_dir()
    assert not list(handle.runner.workspace.glob("~*"))


# -- item 4: a disconnect is a hang-up, and rsync --partial resumes -------------------------------------


async def test_rsync_partial_resumes_after_the_connection_drops(host: Host, short_tmp: Path) -> None:
    cwd = await remote(host, "pwd")
    dest_dir = Path(cwd) / f"orz-rsync-{os.getpid()}"
    dest_dir.mkdir()
    big = short_tmp / "big.bin"
    size = 24 * 1024 * 1024
    big.write_bytes(os.urandom(size))
    pid_file = short_tmp / "ssh.pid"
    wrapper = short_tmp / "ssh-wrapper"
    wrapper.write_text("#!/bin/sh\necho $$ > " + str(pid_file) + "\nexec "
                       + " ".join(host.ssh()) + ' "$@"\n')
    wrapper.chmod(0o755)
    rsync = ["rsync", "--partial", "-e", str(wrapper), str(big), f"{host.dest}:{dest_dir}/"]
    try:
        slow = await asyncio.create_subprocess_exec(*rsync[:1], "--bwlimit=1500", *rsync[1:],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until a few MB arrived (in rsync's hidden temp file), then cut the connection.
        for _ in range(300):
            received = sum(p.stat().st_size for p in dest_dir.iterdir())
            if received > 3 * 1024 * 1024:
                break
            await asyncio.sleep(0.05)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        await asyncio.wait_for(slow.wait(), 10)
        # The remote rsync got the hang-up and kept what it had under the file's own name.
        for _ in range(100):
            names = sorted(p.name for p in dest_dir.iterdir())
            if names == ["big.bin"]:
                break
            await asyncio.sleep(0.05)
        assert names == ["big.bin"], names
        kept = (dest_dir / "big.bin").stat().st_size
        assert 0 < kept < size

        resumed = await run([*rsync[:1], "--stats", *rsync[1:]], timeout=60)
        assert resumed.returncode == 0, resumed.stderr
        assert (dest_dir / "big.bin").read_bytes() == big.read_bytes()
        literal = int(re.search(rb"Literal data: ([\d,]+)", resumed.stdout)[1].replace(b",", b""))  # type: ignore[index]
        assert literal <= size - kept + 1024 * 1024, (literal, kept)
    finally:
        subprocess.run(["rm", "-rf", str(dest_dir)], check=False)


async def test_a_command_that_ignores_the_hang_up_still_ends_when_it_writes(host: Host, short_tmp: Path) -> None:
    """Its output has nowhere to go once the client is gone: it gets EPIPE/SIGPIPE, as under sshd."""
    pid_file = short_tmp / f"yes-{host.name}.pid"
    client = await asyncio.create_subprocess_exec(
        *host.ssh(host.dest, f"trap '' HUP; echo $$ > {pid_file}; exec yes"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    client.kill()
    await client.wait()
    for _ in range(60):  # well before the 5 s after which the runner would SIGKILL it
        if not running(pid):
            break
        await asyncio.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the command kept running after its client went away")


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


# -- item 6: a forward refused by policy says so ---------------------------------------------------------


async def test_a_forward_refused_by_policy_is_administratively_prohibited(host: Host) -> None:
    result = await run(host.ssh("-W", "192.0.2.1:80", host.dest))
    assert result.returncode == 255
    assert b"administratively prohibited" in result.stderr, result.stderr
    if host.name == "orz":
        assert b"only loopback addresses" in result.stderr


# -- item 5: tmux finds the session's server -------------------------------------------------------------


async def test_plain_tmux_commands_find_the_session(orz: Host) -> None:
    assert (await remote(orz, "tmux ls")).startswith("main:")
    attached = await run(orz.ssh("-tt", orz.dest, "tmux attach -t main \\; detach-client"), timeout=15)
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert b"detached" in attached.stdout
