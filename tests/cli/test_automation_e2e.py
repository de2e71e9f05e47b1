"""docs/automation.md as written, against a whole platform (`orz server`): `orz cloud agent` with Ansible,
Fabric, paramiko, ssh and rsync through the gateway, including a certificate that expired meanwhile."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fullstack import FULLSTACK_MARKS, Platform, running_platform
from tests.support import ROOT, wait_until

pytestmark = [*FULLSTACK_MARKS, pytest.mark.timeout(300)]


def doc_examples() -> dict[str, str]:
    """The fenced blocks of docs/automation.md whose first line is ``# example: NAME``."""
    text = (ROOT / "docs" / "automation.md").read_text(encoding="utf-8")
    found = {}
    for block in re.findall(r"```(?:sh|python)\n(.*?)```", text, re.S):
        named = re.match(r"# example: (\w+)", block)
        if named:
            found[named[1]] = block
    return found


@dataclass
class Automation:
    platform: Platform
    session_id: str
    env: dict[str, str]
    work: Path

    @property
    def session_dir(self) -> Path:
        return self.platform.data / "sessions" / self.session_id

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, cwd=self.work, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def example(self, name: str) -> subprocess.CompletedProcess[str]:
        block = doc_examples()[name]
        if name in ("fabric", "paramiko"):  # "run as: orz cloud agent -s "$ORZ_SESSION" -- python3 x.py"
            script = self.work / ("deploy.py" if name == "fabric" else "check.py")
            script.write_text(block, encoding="utf-8")
            return self.run("orz", "cloud", "agent", "-s", self.session_id, "--", sys.executable, script.name)
        return self.run("bash", "-euc", block)


@pytest.fixture(scope="module")
def automation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Automation]:
    # An admin who lets certificates last up to 15 minutes (orz cloud cert --ttl).
    with running_platform(tmp_path_factory.mktemp("automation"), ORZ_CERT_MAX_TTL_S="900") as platform:
        created = platform.orz("cloud", "new", "--program", "bash", "--no-attach", "--wait", cwd=platform.home)
        assert created.returncode == 0, created.stderr
        session_id = created.stdout.split()[1]
        known = platform.home / ".ssh" / "known_hosts"
        known.parent.mkdir(mode=0o700)
        vouched = platform.orz("cloud", "known-hosts")  # as docs/automation.md says, not ssh-keyscan
        assert vouched.returncode == 0, vouched.stderr
        known.write_text(vouched.stdout)
        # The user's key and the session's certificate, as the first `orz cloud agent` makes them: every test
        # starts from them, whichever runs first (expire_certificate replaces the certificate).
        minted = platform.orz("cloud", "agent", "-s", session_id, "--", "true")
        assert minted.returncode == 0, minted.stderr
        # OpenSSH reads the passwd entry's home, not $HOME: point it at this user's known_hosts.
        bin_dir = platform.home / "bin"
        bin_dir.mkdir()
        (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -o UserKnownHostsFile="{known}" "$@"\n')
        (bin_dir / "ssh").chmod(0o755)
        work = platform.home / "work"
        work.mkdir()
        env = {**platform.env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{platform.env['PATH']}",
               "ORZ_SESSION": session_id, "ORZ_GATEWAY_HOST": "127.0.0.1",
               "ORZ_GATEWAY_PORT": str(platform.ssh_port), "ANSIBLE_LOCAL_TEMP": str(work / ".ansible-local")}
        yield Automation(platform, session_id, env, work)


def expire_certificate(automation: Automation) -> bytes:
    """Replace the session's certificate by one the real CA signed and that has expired."""
    import asyncssh

    home = automation.platform.home
    cert_file = home / ".config" / "orzbob" / "certs" / f"{automation.session_id}-cert.pub"
    ca = asyncssh.read_private_key(automation.platform.data / "keys" / "ssh_ca")
    user_key = asyncssh.read_public_key(home / ".config" / "orzbob" / "id_ed25519.pub")
    now = int(time.time())
    expired = ca.generate_user_certificate(user_key, "user:expired", principals=[automation.session_id],
                                           valid_after=now - 600, valid_before=now - 60)
    text = expired.export_certificate("openssh")
    cert_file.write_bytes(text)
    return text


def test_agent_offers_a_fresh_certificate_and_nothing_else(automation: Automation) -> None:
    listed = automation.run("orz", "cloud", "agent", "-s", automation.session_id, "--", "ssh-add", "-L")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("ssh-ed25519-cert-v01@openssh.com ") and len(listed.stdout.splitlines()) == 1
    added = automation.run("orz", "cloud", "agent", "-s", automation.session_id, "--", "ssh-add",
                           str(automation.platform.home / ".config" / "orzbob" / "id_ed25519"))
    assert added.returncode != 0  # the agent holds the user's key only; it takes no others

    unknown = automation.run("orz", "cloud", "agent", "-s", "no-such-session", "--", "true")
    assert unknown.returncode == 3 and unknown.stderr.startswith("orz: "), unknown.stderr  # EXIT_NOT_FOUND


def test_paramiko_example_logs_in_through_the_agent_after_the_certificate_expired(automation: Automation) -> None:
    expired = expire_certificate(automation)
    done = automation.example("paramiko")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"files in the workspace: \d+ exit 0", done.stdout), done.stdout
    cert_file = automation.platform.home / ".config" / "orzbob" / "certs" / f"{automation.session_id}-cert.pub"
    assert cert_file.read_bytes() != expired


def test_fabric_example_puts_to_the_path_pwd_printed(automation: Automation) -> None:
    done = automation.example("fabric")
    assert done.returncode == 0, done.stdout + done.stderr
    workspace = automation.session_dir / "workspace"
    assert done.stdout.strip().endswith(f"lines arrived in {workspace}"), done.stdout
    assert (workspace / "deploy.py").read_text() == (automation.work / "deploy.py").read_text()


def test_ansible_example_copies_to_the_home_and_leaves_the_workspace_clean(automation: Automation) -> None:
    done = automation.example("ansible")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CHANGED" in done.stdout, done.stdout
    home = automation.session_dir / "home"
    assert (home / "from-ansible.txt").read_text() == "deployed by ansible"
    assert not list((automation.session_dir / "workspace").glob("~*"))

    # fetch by the absolute path the session's shell prints, over sftp and over scp
    for method in ("sftp", "scp"):
        fetched = automation.work / f"fetched-{method}.txt"
        done = automation.run("orz", "cloud", "agent", "-s", automation.session_id, "--", "env",
                              f"ANSIBLE_SSH_TRANSFER_METHOD={method}", "ansible", "-i", "inventory.ini", "sessions",
                              "-m", "ansible.builtin.fetch",
                              "-a", f"src={home}/from-ansible.txt dest={fetched} flat=yes")
        assert done.returncode == 0, done.stdout + done.stderr
        assert fetched.read_text() == "deployed by ansible"


def test_ci_example_rsync_and_ssh(automation: Automation) -> None:
    done = automation.example("ci")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["built", str(automation.session_dir / "workspace")]


def test_through_the_gateway_pty_eof_forward_refusal_and_tmux(automation: Automation) -> None:
    """What the runner does for items 3, 5 and 6 reaches the user through the gateway unchanged."""
    ssh = ["orz", "cloud", "agent", "-s", automation.session_id, "--", "ssh", "-p",
           automation.env["ORZ_GATEWAY_PORT"]]
    dest = f"{automation.session_id}@127.0.0.1"
    eof = automation.run(*ssh, "-n", "-tt", dest, "sleep 0.2; echo x")
    assert (eof.returncode, eof.stdout.replace("\r\n", "\n")) == (0, "x\n"), eof.stderr

    refused = automation.run(*ssh, "-W", "192.0.2.1:80", dest)
    assert refused.returncode == 255
    assert "administratively prohibited" in refused.stderr and "only loopback" in refused.stderr, refused.stderr

    tmux = automation.run(*ssh, dest, "tmux ls")
    assert tmux.returncode == 0 and tmux.stdout.startswith("main:"), tmux.stdout + tmux.stderr


def test_rsync_partial_resumes_through_the_gateway(automation: Automation) -> None:
    """The agent serving in the foreground (for `eval`), and a dropped connection through the gateway:
    the runner's rsync keeps the part it received and the second run sends only the rest."""
    served = subprocess.Popen(["orz", "cloud", "agent", "-s", automation.session_id], env=automation.env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert served.stdout is not None
        line = served.stdout.readline()
        sock = re.match(r"SSH_AUTH_SOCK=(\S+); export SSH_AUTH_SOCK;", line)
        assert sock, line
        env = {**automation.env, "SSH_AUTH_SOCK": sock[1]}
        big = automation.work / "big.bin"
        size = 16 * 1024 * 1024
        big.write_bytes(os.urandom(size))
        pid_file = automation.work / "ssh.pid"
        wrapper = automation.work / "ssh-once"
        wrapper.write_text(f'#!/bin/sh\necho $$ > {pid_file}\nexec ssh -p {automation.env["ORZ_GATEWAY_PORT"]} "$@"\n')
        wrapper.chmod(0o755)
        dest = automation.session_dir / "workspace" / "rsync-in"  # rsync makes it, as the session's user
        target = f"{automation.session_id}@127.0.0.1:rsync-in/"
        slow = subprocess.Popen(["rsync", "--partial", "--bwlimit=1500", "-e", str(wrapper), str(big), target],
                                env=env, cwd=automation.work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: dest.is_dir() and sum(p.stat().st_size for p in dest.iterdir()) > 2 * 1024 * 1024, 30,
                   what="the first 2 MB")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        slow.wait(10)
        wait_until(lambda: sorted(p.name for p in dest.iterdir()) == ["big.bin"], 10,
                   what="the partial file under its own name")
        kept = (dest / "big.bin").stat().st_size
        assert 0 < kept < size

        resumed = subprocess.run(["rsync", "--partial", "--stats", "-e", str(wrapper), str(big), target], env=env,
                                 cwd=automation.work, capture_output=True, text=True, timeout=120, check=False)
        assert resumed.returncode == 0, resumed.stderr
        assert (dest / "big.bin").read_bytes() == big.read_bytes()
        literal = int(re.search(r"Literal data: ([\d,]+)", resumed.stdout)[1].replace(",", ""))  # type: ignore[index]
        assert literal <= size - kept + 1024 * 1024, (literal, kept)
    finally:
        served.send_signal(signal.SIGTERM)
        code = served.wait(10)
        if served.stdout is not None:
            served.stdout.close()
    assert code == 0
    assert not Path(sock[1]).exists()


def test_cert_file_lasts_as_long_as_asked_up_to_the_admins_limit(automation: Automation) -> None:
    from cryptography.hazmat.primitives import serialization

    done = automation.run("orz", "cloud", "cert", automation.session_id, "--ttl", "15m")
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(":", 1) for line in done.stdout.splitlines())
    cert_file, key_file = Path(fields["certificate"].strip()), Path(fields["key"].strip())
    cert = serialization.load_ssh_public_identity(cert_file.read_bytes())
    assert isinstance(cert, serialization.SSHCertificate)
    assert cert.valid_before - cert.valid_after == 900 + 30  # backdated 30 s for clock skew

    # The gateway takes it (its limit is the same setting), from the file alone: no agent, no refresh.
    ssh = automation.run("ssh", "-F", "/dev/null", "-p", automation.env["ORZ_GATEWAY_PORT"], "-i", str(key_file),
                         "-o", f"CertificateFile={cert_file}", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                         "-o", "BatchMode=yes", f"{automation.session_id}@127.0.0.1", "echo from-the-file")
    assert (ssh.returncode, ssh.stdout) == (0, "from-the-file\n"), ssh.stderr

    too_long = automation.run("orz", "cloud", "cert", automation.session_id, "--ttl", "2h")
    assert too_long.returncode == 2  # input the API refused (422), as a bad --ttl value is
    assert "orz: a certificate may last at most 900 s on this server, not 7200 s" in too_long.stderr, too_long.stderr


def test_script_example_creates_reads_and_kills_a_session_without_a_terminal(automation: Automation) -> None:
    done = automation.example("script")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "running"
    assert "killed" in done.stdout and "status exit code: 3" in done.stdout
    assert "no such session" in done.stderr
