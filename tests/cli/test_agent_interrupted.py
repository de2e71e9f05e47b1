"""An interrupted `orz cloud agent -- COMMAND` leaves no command running behind it: the real `orz` against a
real API server (FakeProvider), interrupted as Ctrl-C or a CI runner's SIGINT would, or stopped with
SIGTERM (docker stop, systemd, a CI runner's cancel), which used to end orz at once and orphan the command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.cloud_automation import COMMAND_GRACE_S
from tests.cli.conftest import LiveApi, Orz
from tests.cli.test_cloud_commands import create
from tests.conftest import Tenant
from tests.support import ROOT, wait_until


def _running(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _pid(pid_file: Path) -> str:
    return pid_file.read_text().strip() if pid_file.exists() else ""


@pytest.mark.parametrize(("signum", "stubborn", "code", "said"), [
    (signal.SIGINT, False, 1, "Aborted!"),  # Ctrl-C (docs/cli.md)
    (signal.SIGTERM, False, 128 + signal.SIGTERM, ""),  # as a shell reports a process SIGTERM ended
    (signal.SIGTERM, True, 128 + signal.SIGTERM, ""),  # a command that ignores SIGTERM is killed after the grace
])
def test_an_interrupted_agent_stops_its_command(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path,
                                                signum: int, stubborn: bool, code: int, said: str) -> None:
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid)
    pid_file = tmp_path / "command.pid"
    agent = subprocess.Popen(
        [sys.executable, "-m", "cli", "cloud", "agent", "-s", sid, "--", "sh", "-c",
         ("trap '' TERM; " if stubborn else "") + f"echo $$ > {pid_file}; exec sleep 60"],
        cwd=ROOT, env=orz.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_until(lambda: agent.poll() is not None or _pid(pid_file), timeout=20, what="the command")
        except TimeoutError:
            agent.kill()
            raise AssertionError(f"orz cloud agent started no command: {agent.communicate()[1]!r}") from None
        assert _pid(pid_file), f"orz cloud agent exited {agent.returncode}: {agent.communicate()[1]!r}"
        command = int(pid_file.read_text())
        assert _running(command)
        started = time.monotonic()
        agent.send_signal(signum)  # to orz alone: the command hears it only from orz
        _, err = agent.communicate(timeout=20)  # without the reaping, orz waited for the command to end
        waited = time.monotonic() - started
        assert agent.returncode == code and err.strip() == said, (agent.returncode, err)
        assert not _running(command)  # asked to stop (SIGTERM) and reaped, not left running without its agent
        # SIGTERM ended the command at once; one that ignores it is killed after the grace, not before.
        assert (waited >= COMMAND_GRACE_S) == stubborn, waited
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.communicate()  # reaped, its pipes closed (left open, a later test's garbage collection found them)
        if pid_file.exists() and pid_file.read_text().strip() and _running(int(pid_file.read_text())):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
