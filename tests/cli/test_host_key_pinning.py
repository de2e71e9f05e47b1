"""The gateway's host key is pinned from the API before ssh first connects, end to end: the real `orz
server`, `orz cloud ssh-config` and the OpenSSH client.

Without the pin, the CLI's known_hosts started empty and ssh trusted whatever answered at the gateway's
address on first use (`StrictHostKeyChecking accept-new`): an impostor there got the user's session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.fullstack import FULLSTACK_MARKS, Platform, running_platform

pytestmark = FULLSTACK_MARKS


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("pin"), ORZ_QUOTA_FREE="10") as running:
        yield running


def ssh(platform: Platform, sid: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-F", str(platform.home / ".ssh" / "config"), "-o", "BatchMode=yes",
                           f"{sid}.orz", "echo", "in-the-session"],
                          env=platform.env, capture_output=True, text=True, timeout=120, check=False)


def known_hosts(platform: Platform) -> Path:
    return platform.home / ".config" / "orzbob" / "known_hosts"


def gateway_key(platform: Platform) -> list[str]:
    return (platform.data / "keys" / "gateway_host_ed25519.pub").read_text().split()[:2]


def hashed(name: str) -> str:
    """A known_hosts host field as ssh writes it under `HashKnownHosts yes` (Debian's default)."""
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def test_first_connection_checks_the_key_the_api_names(platform: Platform) -> None:
    sid, _ = platform.bash_session()
    known_hosts(platform).unlink(missing_ok=True)
    done = ssh(platform, sid)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "in-the-session\n"
    assert "Permanently added" not in done.stderr  # nothing was trusted on first use
    lines = known_hosts(platform).read_text().splitlines()
    assert [line.split() for line in lines] == [[f"[127.0.0.1]:{platform.ssh_port}", *gateway_key(platform)]]


def test_a_rotated_key_replaces_the_pinned_one(platform: Platform) -> None:
    """An operator rotated the key: the API's word replaces the old pin (a hashed line, as ssh writes
    them), other hosts' lines stay, and the user is not stopped by a "host identification has changed"."""
    sid, _ = platform.bash_session()
    old = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2]
    other = "[elsewhere.example]:2222 " + " ".join(old)
    name = f"[127.0.0.1]:{platform.ssh_port}"
    known_hosts(platform).write_text(f"{hashed(name)} {' '.join(old)}\n{other}\n")
    done = ssh(platform, sid)
    assert done.returncode == 0, done.stderr
    assert "IDENTIFICATION HAS CHANGED" not in done.stderr
    assert known_hosts(platform).read_text().splitlines() == [other, f"{name} {' '.join(gateway_key(platform))}"]


def test_an_impostor_at_the_gateways_address_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The API vouches for one key and something else answers at the address: ssh stops before
    authenticating, on the first connection too."""
    vouched = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    # A short base: the session's state dir holds unix sockets.
    with running_platform(tmp_path_factory.mktemp("imp"), ORZ_GATEWAY_HOST_PUBLIC_KEY=vouched) as platform:
        sid, _ = platform.bash_session()
        done = ssh(platform, sid)
        assert done.returncode == 255, done.stdout
        assert "in-the-session" not in done.stdout
        assert "Host key verification failed" in done.stderr, done.stderr


def test_known_hosts_prints_what_a_strict_ssh_needs(platform: Platform, tmp_path: Path) -> None:
    """For tools that read ~/.ssh/known_hosts (Ansible, rsync, CI): `orz cloud known-hosts` replaces
    docs/automation.md's ssh-keyscan, which trusted whatever answered."""
    sid, config = platform.bash_session()
    printed = platform.orz("cloud", "known-hosts")
    assert printed.returncode == 0, printed.stderr
    assert [line.split() for line in printed.stdout.splitlines()] == [
        [f"[127.0.0.1]:{platform.ssh_port}", *gateway_key(platform)]]
    own = tmp_path / "known_hosts"
    own.write_text(printed.stdout)
    done = subprocess.run(["ssh", "-F", config, "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={own}",
                           "-o", "StrictHostKeyChecking=yes", f"{sid}.orz", "echo", "strict"],
                          env=platform.env, capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, "strict\n"), done.stderr
    assert own.read_text() == printed.stdout
