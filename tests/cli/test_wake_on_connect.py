"""Idle stop and wake on connect, end to end: the reaper stops an idle session, and a plain `ssh`
to it starts it again on the same workspace (a file written before the stop is there, init not re-run).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fullstack import Platform, running_platform
from tests.support import wait_until

pytestmark = pytest.mark.integration

CLOUD_YAML = """version: "1.0"
setup:
  init: echo ran >> init-runs.txt
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    # Sessions idle for 10 s are stopped; the reaper looks every second.
    with running_platform(tmp_path_factory.mktemp("wake"), ORZ_IDLE_TIMEOUT_S="10",
                          ORZ_REAP_INTERVAL_S="1") as running:
        yield running


def make_repo(base: Path) -> Path:
    repo = base / "repo"
    (repo / ".orz").mkdir(parents=True)
    (repo / ".orz" / "cloud.yaml").write_text(CLOUD_YAML)
    (repo / "README").write_text("hello\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return repo


def ssh(platform: Platform, sid: str, command: str) -> subprocess.CompletedProcess[str]:
    """Run one remote command line (ssh joins its arguments with spaces, as sshd would see them)."""
    config = platform.home / ".ssh" / "config"
    return subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{sid}.orz", command],
                          env=platform.env, capture_output=True, text=True, timeout=120, check=False)


def status(platform: Platform, sid: str) -> dict:
    return json.loads(platform.orz("cloud", "status", sid, "--json").stdout)["instance"]


def test_idle_session_is_stopped_and_ssh_wakes_it_on_the_same_workspace(platform: Platform, tmp_path) -> None:
    repo = make_repo(tmp_path)
    created = platform.orz("cloud", "new", "--repo", f"file://{repo}", "--branch", "main", "--program", "bash",
                           "--no-attach", "--wait")
    assert created.returncode == 0, created.stderr
    sid = created.stdout.split()[1]
    assert platform.orz("cloud", "ssh-config", "--write").returncode == 0

    wrote = ssh(platform, sid, "echo before-stop > kept.txt && cat init-runs.txt")
    assert wrote.returncode == 0, wrote.stderr
    assert wrote.stdout == "ran\n"

    wait_until(lambda: status(platform, sid)["status"] == "stopped", timeout=60, interval=0.5,
               what="the idle reaper to stop the session")
    assert status(platform, sid)["reason"] == "idle"

    started = time.monotonic()
    woke = ssh(platform, sid, "cat kept.txt init-runs.txt")
    assert woke.returncode == 0, woke.stderr
    assert woke.stdout == "before-stop\nran\n", woke.stderr  # same workspace, init ran once
    assert "starting" in woke.stderr  # the user saw progress while it woke
    assert time.monotonic() - started < 60
    assert status(platform, sid)["status"] == "running"
    events = json.loads(platform.orz("cloud", "status", sid, "--json").stdout)["events"]
    assert any(e["kind"] == "woke" for e in events)
    # kept.txt was never committed: kill says so instead of throwing it away, --force does it anyway.
    refused = platform.orz("cloud", "kill", sid)
    assert refused.returncode == 6 and "unsaved work" in refused.stderr, refused.stderr
    assert platform.orz("cloud", "kill", "--force", sid).returncode == 0
