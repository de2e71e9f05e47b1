"""Secrets end to end: `orz cloud secrets create`, a session created with `--secrets`, and the value is in
the environment of a command run over a real `ssh` attach, while no log, CLI output or API response
shows it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.cli.test_wake_on_connect import ssh
from tests.fullstack import Platform, running_platform

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
