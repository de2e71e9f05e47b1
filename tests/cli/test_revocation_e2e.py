"""`orz admin disable-user` ends the user's live attachments on every gateway replica, for real.

`orz server` (API, gateway, local runner with tmux) plus a second `orz gateway` process in front of the
same API; the real `ssh` attached to the session's tmux through each gateway; then the operator disables
the user. Both terminals show the reason and end, and a new exec on the ControlMaster connection is refused.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pexpect
import pytest

from tests.fullstack import FULLSTACK_MARKS, Platform, gateway_process, running_platform
from tests.support import free_port

pytestmark = FULLSTACK_MARKS
REASON = "orz: your account is disabled"


@pytest.fixture
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    # A short base: the session's tmux socket path must fit a unix socket name.
    with running_platform(tmp_path_factory.mktemp("rv")) as running:
        yield running


@pytest.fixture
def second_gateway(platform: Platform) -> Iterator[int]:
    """Another gateway replica: its own process, the same API, keys and service token."""
    ssh_port, web_port = free_port(), free_port()
    with gateway_process(platform, ssh_port, web_port, ORZ_GATEWAY_DRAIN_S="5"):
        yield ssh_port


def test_disabling_a_user_cuts_their_terminals_on_every_gateway(platform: Platform, second_gateway: int) -> None:
    sid, config = platform.bash_session()
    control = platform.home / "ctl"

    first = platform.spawn("ssh", "-F", config, f"{sid}.orz")
    second = platform.spawn("ssh", "-F", config, "-p", str(second_gateway), "-o", "ControlMaster=yes",
                            "-o", f"ControlPath={control}", f"{sid}.orz")
    for child in (first, second):
        child.expect(r"\[main\]")  # tmux drew its status line: attached
    time.sleep(0.3)
    first.sendline("echo typed''-before")
    first.expect("typed-before")

    database = f"sqlite+aiosqlite:///{platform.data / 'orz.db'}"
    disabled = platform.orz("admin", "disable-user", "--database-url", database, "admin@localhost")
    assert disabled.returncode == 0, disabled.stderr
    # Within 5 s (the access watch polls every second) both terminals show why, and end.
    for child in (first, second):
        child.expect(REASON, timeout=5)
        child.expect(pexpect.EOF, timeout=5)
        child.close()
        assert child.exitstatus != 0 or child.signalstatus is not None

    again = subprocess.run(["ssh", "-F", config, "-p", str(second_gateway), "-o", f"ControlPath={control}",
                            "-o", "ControlMaster=no", "-o", "BatchMode=yes", f"{sid}.orz", "echo after"],
                           env=platform.env, capture_output=True, text=True, timeout=30, check=False)
    assert again.returncode != 0 and "after" not in again.stdout
    assert "your account is disabled" in again.stderr, again.stderr
