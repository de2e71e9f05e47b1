"""Secrets end to end: `orz cloud secrets create`, a session created with `--secrets`, and the value is in
the environment of a command run over a real `ssh` attach, while no log, CLI output or API response
shows it."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.cli.test_wake_on_connect import ssh
from tests.fullstack import Platform, running_platform
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with running_platform(tmp_path_factory.mktemp("secrets")) as running:
        yield running


def test_secret_reaches_the_attached_session_and_nothing_else(platform: Platform) -> None:
    value = "sk-test-" + secrets.token_hex(16)
    created = platform.orz("cloud", "secrets", "create", "anthropic", "--data", f"ANTHROPIC_API_KEY={value}")
    assert created.returncode == 0, created.stderr
    listed = platform.orz("cloud", "secrets", "list")
    assert "anthropic" in listed.stdout and "ANTHROPIC_API_KEY" in listed.stdout

    new = platform.orz("cloud", "new", "--program", "bash", "--secrets", "anthropic", "--no-attach", "--wait",
                       cwd=platform.home)
    assert new.returncode == 0, new.stderr
    sid = new.stdout.split()[1]
    assert platform.orz("cloud", "ssh-config", "--write").returncode == 0

    shown = ssh(platform, sid, 'echo "key=$ANTHROPIC_API_KEY"')
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"key={value}\n"

    status = platform.orz("cloud", "status", sid, "--json")
    logs = platform.orz("cloud", "logs", sid)
    everything = created.stdout + created.stderr + listed.stdout + new.stdout + new.stderr + status.stdout + logs.stdout
    server_log = platform.log.read_text() + platform.screen.read_text()
    assert value not in everything
    assert value not in server_log
    runner_log = (platform.data / "sessions" / sid / "runner.log").read_text()
    assert runner_log and value not in runner_log
    assert platform.orz("cloud", "kill", sid).returncode == 0


def test_a_session_missing_a_secret_fails_saying_which_and_what_it_had(platform: Platform, tmp_path) -> None:
    """Not checked by `new` (a URL, not a checkout here): the runner's failure names the ${KEY}, the keys the
    session's secrets do have, and how to start one that works."""
    repo = tmp_path / "needs-secret"
    (repo / ".orz").mkdir(parents=True)
    (repo / ".orz" / "cloud.yaml").write_text('version: "1.0"\nenv:\n  GH: ${GH_TOKEN}\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    new = platform.orz("cloud", "new", "--repo", repo.as_uri(), "--branch", "main", "--program", "bash",
                       "--no-attach", cwd=platform.home)
    assert new.returncode == 0, new.stderr
    sid = new.stdout.split()[1]
    wait_until(lambda: json.loads(platform.orz("cloud", "status", sid, "--json").stdout)["instance"]["status"]
               == "failed", timeout=60, what="the session to fail")
    shown = platform.orz("cloud", "status", sid).stdout
    assert (".orz/cloud.yaml:3: env.GH: ${GH_TOKEN} is not one of this session's secrets (it has none: no "
            "--secrets were named)") in shown, shown
    assert "orz cloud new --secrets NAME" in shown
