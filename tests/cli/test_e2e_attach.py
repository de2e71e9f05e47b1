"""The quick start for real: `orz server` (API, gateway, local runner with tmux), then `orz cloud new`,
type into the attached session through the real `ssh`, detach, re-attach, `ssh <id>.orz` (also with an
expired certificate), list, kill. Driven through a terminal with pexpect.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.fullstack import FULLSTACK_MARKS, Platform, detach, running_platform, type_and_see, wait_for_tmux
from tests.support import ROOT

pytestmark = FULLSTACK_MARKS


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("e2e")) as running:
        yield running




def test_quick_start_new_type_detach_reattach_list_kill(platform: Platform) -> None:
    # From a directory that is no git repo: an empty workspace, nothing cloned from the network.
    child = platform.spawn(sys.executable, "-m", "cli", "cloud", "new", "--program", "bash", cwd=platform.home)
    child.expect(r"session (\S+) created")
    sid = child.match.group(1)
    index = child.expect([r"attaching to", r"orz: .*"])
    assert index == 0, child.after
    wait_for_tmux(child)
    type_and_see(child, "hello-e2e")
    detach(child)

    listed = platform.orz("cloud", "list")
    assert any(line.startswith(sid) and "running" in line for line in listed.stdout.splitlines()), listed.stdout

    again = platform.spawn(sys.executable, "-m", "cli", "cloud", "attach", sid)
    again.expect("hello-e2e")  # the same tmux session: earlier output is still on screen
    wait_for_tmux(again)
    type_and_see(again, "again-e2e")
    detach(again)

    # An attach URL, as the Go CLI's `attach` took it, names the same session.
    listing = json.loads(platform.orz("cloud", "list", "--json").stdout)
    url = next(i["attach_url"] for i in listing["instances"] if i["id"] == sid)
    by_url = platform.spawn(sys.executable, "-m", "cli", "cloud", "attach", url)
    by_url.expect("again-e2e")
    wait_for_tmux(by_url)
    detach(by_url)

    killed = platform.orz("cloud", "kill", sid)
    assert killed.returncode == 0, killed.stderr
    assert sid not in platform.orz("cloud", "list").stdout


def test_plain_ssh_to_id_orz_also_after_the_certificate_expired(platform: Platform) -> None:
    created = platform.orz("cloud", "new", "--program", "bash", "--no-attach", "--wait", cwd=platform.home)
    assert created.returncode == 0, created.stderr
    sid = created.stdout.split()[1]
    assert platform.orz("cloud", "ssh-config", "--write").returncode == 0
    user_config = platform.home / ".ssh" / "config"  # ssh reads the passwd home's config, so pass it

    child = platform.spawn("ssh", "-F", str(user_config), f"{sid}.orz")
    wait_for_tmux(child)
    type_and_see(child, "plain-ssh")
    detach(child)

    # Replace the certificate by an expired one signed by the real CA: ssh must refresh it by itself.
    import asyncssh

    cert_file = platform.home / ".config" / "orzbob" / "certs" / f"{sid}-cert.pub"
    ca = asyncssh.read_private_key(platform.data / "keys" / "ssh_ca")
    user_key = asyncssh.read_public_key(platform.home / ".config" / "orzbob" / "id_ed25519.pub")
    now = int(time.time())
    expired = ca.generate_user_certificate(user_key, "user:expired", principals=[sid],
                                           valid_after=now - 600, valid_before=now - 60)
    expired_text = expired.export_certificate("openssh")
    cert_file.write_bytes(expired_text)

    child = platform.spawn("ssh", "-F", str(user_config), f"{sid}.orz")
    wait_for_tmux(child)
    type_and_see(child, "after-expiry")
    detach(child)
    assert cert_file.read_bytes() != expired_text
    assert platform.orz("cloud", "kill", sid).returncode == 0


def test_smoke_script_ping_pong(platform: Platform) -> None:
    """hack/smoke.py, the operator's check of a running platform, passes against `orz server`."""
    out = subprocess.run([sys.executable, str(ROOT / "hack" / "smoke.py")], env=platform.env, cwd=ROOT,
                         capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke: ping -> pong" in out.stdout and "smoke: OK" in out.stdout
