"""Never lose work, for real: `orz server` (API, gateway, local runners without the sandbox, so a file://
origin takes pushes), `orz cloud diff` over the real ssh, `orz cloud kill` refusing and then --force
pushing the WIP branch before the workspace goes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fullstack import FULLSTACK_MARKS, Platform, running_platform

pytestmark = FULLSTACK_MARKS


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("work"), ORZ_SANDBOX="off", ORZ_WORK_SCAN_S="1",
                          ORZ_HEARTBEAT_INTERVAL_S="1") as running:
        yield running


def bare_repo(base: Path) -> Path:
    bare, src = base / "origin.git", base / "src"
    env = {"GIT_CONFIG_GLOBAL": "/dev/null", "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True, env=env)
    subprocess.run(["git", "init", "-q", "-b", "main", str(src)], check=True, env=env)
    (src / "README").write_text("hello\n")
    for args in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "first"],
                 ["push", "-q", str(bare), "main"]):
        subprocess.run(["git", "-C", str(src), *args], check=True, env=env)
    return bare


def wait_for(platform: Platform, sid: str, predicate, timeout: float = 30) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        inst = json.loads(platform.orz("cloud", "status", sid, "--json").stdout)["instance"]
        if predicate(inst):
            return inst
        assert time.monotonic() < deadline, inst
        time.sleep(0.5)


def test_diff_then_kill_refuses_then_force_pushes_the_wip_branch(platform: Platform, tmp_path: Path) -> None:
    bare = bare_repo(tmp_path)
    program = "bash -c 'echo changed > README; echo idea > notes.txt; sleep infinity'"
    made = platform.orz("cloud", "new", "--no-attach", "--wait", "--repo", bare.as_uri(), "--branch", "main",
                        "--program", program, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    sid = made.stdout.split()[1]
    wait_for(platform, sid, lambda i: (i.get("work") or {}).get("dirty_files") == 2)

    diff = platform.orz("cloud", "diff", sid)
    assert diff.returncode == 0, diff.stderr
    assert " M README" in diff.stdout and "?? notes.txt" in diff.stdout
    assert "-hello" in diff.stdout and "+changed" in diff.stdout
    assert "no changes" not in diff.stderr

    refused = platform.orz("cloud", "kill", sid)
    assert refused.returncode == 6  # EXIT_UNSAVED_WORK (docs/cli.md)
    assert "has unsaved work: 2 uncommitted files (README, notes.txt), 0 unpushed commits" in refused.stderr
    forced = platform.orz("cloud", "kill", sid, "--force")
    assert forced.returncode == 0, forced.stderr
    shown = subprocess.run(["git", "-C", str(bare), "show", f"orz/{sid}:notes.txt"], capture_output=True, text=True,
                           check=False)
    assert shown.stdout == "idea\n", shown.stderr


def test_diff_and_logs_of_a_session_without_a_repository_say_so(platform: Platform, tmp_path: Path) -> None:
    made = platform.orz("cloud", "new", "--no-attach", "--wait", "--program", "sleep infinity", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    sid = made.stdout.split()[1]
    diff = platform.orz("cloud", "diff", sid)
    assert diff.returncode == 1
    assert diff.stderr.strip().splitlines()[-1] == (
        "orz: the session's workspace is not a git repository (the session was made without --repo)")
    assert "fatal" not in diff.stderr
    logs = platform.orz("cloud", "logs", sid)
    assert (logs.returncode, logs.stdout) == (0, "")
    assert logs.stderr == f"(no init log: {sid} has run no setup.init, or it printed nothing)\n"
    assert platform.orz("cloud", "kill", sid, "--force").returncode == 0


def test_diff_of_a_clean_workspace_says_there_is_nothing_and_heads_unpushed_commits(platform: Platform,
                                                                                   tmp_path: Path) -> None:
    """Not a blank screen (is it broken? still starting?): one line says the workspace holds nothing of its own."""
    bare = bare_repo(tmp_path)
    made = platform.orz("cloud", "new", "--no-attach", "--wait", "--repo", bare.as_uri(), "--branch", "main",
                        "--program", "sleep infinity", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    sid = made.stdout.split()[1]
    clean = platform.orz("cloud", "diff", sid)
    assert (clean.returncode, clean.stdout) == (0, "")
    assert clean.stderr.strip().splitlines()[-1] == "no changes: nothing uncommitted, and every commit is on a " \
        "remote branch"
    config = platform.home / ".ssh" / "config"
    assert platform.orz("cloud", "ssh-config", "--write").returncode == 0
    committed = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{sid}.orz",
                                "git -c user.name=t -c user.email=t@e commit -q --allow-empty -m 'local only'"],
                               env=platform.env, capture_output=True, text=True, timeout=60, check=False)
    assert committed.returncode == 0, committed.stderr
    ahead = platform.orz("cloud", "diff", sid)
    assert ahead.returncode == 0, ahead.stderr
    assert ahead.stdout.splitlines()[0] == "commits on no remote branch:" and "local only" in ahead.stdout
    assert "no changes" not in ahead.stderr
    assert platform.orz("cloud", "kill", sid, "--force").returncode == 0
