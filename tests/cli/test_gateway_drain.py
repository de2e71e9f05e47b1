"""A gateway replica restarting under an attached user, for real (#19 drain).

`orz server` runs the API and the local runners (tmux); users attach at another port, where the tests'
own `orz gateway` processes listen, one after the other, as replicas behind one load balancer address
would. SIGTERM drains a gateway: the attached terminal reads why, keeps working, new connections are
refused and /readyz answers 503, and at the drain deadline the connection ends with the reason; the
session itself keeps running. `orz cloud attach` then comes back by itself through the same address.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pexpect
import pytest

from tests.fullstack import (
    FULLSTACK_MARKS,
    Platform,
    detach,
    gateway_process,
    running_platform,
    type_and_see,
    wait_for_tmux,
)
from tests.support import free_port, wait_until

pytestmark = FULLSTACK_MARKS
RESTARTING = "this gateway is restarting"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    # Attach grants name this port: the one the tests' gateway processes take turns listening on.
    public = free_port()
    with running_platform(tmp_path_factory.mktemp("dr"), ORZ_PUBLIC_SSH_PORT=str(public)) as running:
        yield running


def public_port(platform: Platform) -> int:
    return int(platform.env["ORZ_PUBLIC_SSH_PORT"])


def new_session(platform: Platform) -> str:
    created = platform.orz("cloud", "new", "--program", "bash", "--no-attach", "--wait", cwd=platform.home)
    assert created.returncode == 0, created.stderr
    return created.stdout.split()[1]




def readyz(web_port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{web_port}/readyz", timeout=5).status_code


def test_sigterm_drains_an_attached_terminal_and_the_session_keeps_running(platform: Platform) -> None:
    sid = new_session(platform)
    assert platform.orz("cloud", "ssh-config", "--write").returncode == 0
    config = str(platform.home / ".ssh" / "config")
    port, web_port, drain_s = public_port(platform), free_port(), 8

    with gateway_process(platform, port, web_port, name="gw-a", ORZ_GATEWAY_DRAIN_S=str(drain_s)) as gateway:
        child = platform.spawn("ssh", "-tt", "-F", config, f"{sid}.orz")
        wait_for_tmux(child)
        type_and_see(child, "before-drain")
        assert readyz(web_port) == 200

        gateway.send_signal(signal.SIGTERM)
        child.expect(RESTARTING, timeout=10)  # the line in the user's terminal
        child.expect(f"orz cloud attach {sid}")
        wait_until(lambda: readyz(web_port) == 503, timeout=10, what="/readyz to answer 503")

        # Nobody new gets in through this replica...
        refused = subprocess.run(["ssh", "-F", config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                                  f"{sid}.orz", "echo in"],
                                 env=platform.env, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 255 and "Connection refused" in refused.stderr, refused.stderr
        # ...while the attached user keeps working until the deadline, then reads why the connection ended.
        type_and_see(child, "during-drain")
        # (the line in the terminal; ssh may instead print the disconnect message, which says the same)
        child.expect(f"({RESTARTING}: this connection ends now|Received disconnect.*{RESTARTING})",
                     timeout=drain_s + 30)
        child.expect(pexpect.EOF, timeout=10)
        child.close()
        assert child.exitstatus == 255
        assert gateway.wait(timeout=30) == 0  # the drain ended, the gateway exited cleanly

    # The session never noticed: through the next replica at the same address, the same tmux.
    with gateway_process(platform, port, free_port(), name="gw-b"):
        again = platform.spawn("ssh", "-tt", "-F", config, f"{sid}.orz")
        again.expect("during-drain")
        wait_for_tmux(again)
        type_and_see(again, "after-drain")
        detach(again)
    assert platform.orz("cloud", "kill", sid).returncode == 0


def test_cloud_attach_reconnects_by_itself_after_a_gateway_restart(platform: Platform) -> None:
    sid = new_session(platform)
    port = public_port(platform)

    with gateway_process(platform, port, free_port(), name="gw-c", ORZ_GATEWAY_DRAIN_S="3") as old:
        child = platform.spawn(sys.executable, "-m", "cli", "cloud", "attach", sid)
        wait_for_tmux(child)
        type_and_see(child, "before-restart")

        old.send_signal(signal.SIGTERM)
        child.expect(RESTARTING, timeout=10)
        # A new replica behind the same address while the old one drains (its listener is closed now).
        with gateway_process(platform, port, free_port(), name="gw-d"):
            child.expect(f"reconnecting to {sid}", timeout=40)
            child.expect("before-restart", timeout=30)  # the same tmux session, redrawn
            wait_for_tmux(child)
            type_and_see(child, "after-restart")
            detach(child)  # a detach ends attach: no reconnect
            assert old.wait(timeout=30) == 0
    assert platform.orz("cloud", "kill", sid).returncode == 0


def test_a_second_sigterm_ends_the_drain_now(platform: Platform) -> None:
    sid = new_session(platform)
    assert platform.orz("cloud", "ssh-config", "--write").returncode == 0
    config = str(platform.home / ".ssh" / "config")
    with gateway_process(platform, public_port(platform), free_port(), name="gw-e",
                         ORZ_GATEWAY_DRAIN_S="600") as gateway:
        child = platform.spawn("ssh", "-tt", "-F", config, f"{sid}.orz")
        wait_for_tmux(child)
        gateway.send_signal(signal.SIGTERM)
        child.expect(RESTARTING, timeout=10)
        gateway.send_signal(signal.SIGTERM)  # the operator (or the kubelet's SIGKILL) will not wait 600 s
        child.expect(pexpect.EOF, timeout=30)
        child.close()
        assert child.exitstatus == 255
        assert gateway.wait(timeout=30) == 0
    assert platform.orz("cloud", "kill", sid).returncode == 0
