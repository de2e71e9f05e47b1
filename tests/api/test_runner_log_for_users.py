"""`orz cloud logs` on the local provider: the init log, and of the runner's log only what a user needs."""

from __future__ import annotations

from api.instances.providers.local import runner_log_for_users

RUNNER_LOG = """\
sent tapfd=5 for tap0
received tapfd=5
2026-12-05 15:55:04,363 INFO asyncssh: Creating SSH listener on already-connected socket
2026-12-05 15:55:04,418 INFO runner.main: session s1 is ready
2026-12-05 15:55:04,448 INFO httpx: HTTP Request: POST http://127.0.0.1:8080/internal/v1/i/s1/hb "HTTP/1.1 200 OK"
2026-12-05 15:55:05,001 WARNING runner.main: sidecar ports [5432] still closed; going on without them
2026-12-05 15:55:06,002 ERROR runner.main: runner failed
Traceback (most recent call last):
  File "x.py", line 1, in <module>
OSError: boom
bwrap: Can't mount proc on /newroot/proc: Operation not permitted
"""


def test_routine_lines_go_and_problems_stay() -> None:
    shown = runner_log_for_users(RUNNER_LOG)
    assert "tapfd" not in shown and "HTTP Request" not in shown and "asyncssh" not in shown
    assert "is ready" not in shown
    assert "WARNING runner.main: sidecar ports [5432] still closed" in shown
    assert "ERROR runner.main: runner failed\nTraceback (most recent call last):\n" in shown
    assert "OSError: boom\n" in shown
    assert shown.endswith("bwrap: Can't mount proc on /newroot/proc: Operation not permitted\n")


def test_the_network_helpers_goodbye_is_routine_too() -> None:
    """What `orz cloud logs` showed under a failed clone: the fatal line, then slirp4netns saying it exits."""
    log = ("2026-12-06 05:15:46,637 ERROR runner.main: fatal: git clone of file:///r failed: no such repo\n"
           "exitfd event\ndo_slirp is exiting\n")
    assert runner_log_for_users(log) == ("2026-12-06 05:15:46,637 ERROR runner.main: fatal: git clone of "
                                         "file:///r failed: no such repo\n")


def test_a_line_after_the_network_helpers_goodbye_is_kept() -> None:
    log = "exitfd event\ndo_slirp is exiting\nbwrap: Can't mount proc on /newroot/proc: Operation not permitted\n"
    assert runner_log_for_users(log) == "bwrap: Can't mount proc on /newroot/proc: Operation not permitted\n"


def test_a_config_warning_the_init_log_shows_is_not_repeated() -> None:
    """`orz cloud new --wait` showed `.orz/cloud.yaml`'s warning under "== init log ==" and again under
    "== runner log ==" (runner.main's _warn writes both); other warnings stay."""
    init_log = "[orz] warning: .orz/cloud.yaml:2: foo: unknown key, ignored\n$ make\n"
    log = ("2026-12-06 12:12:59,545 WARNING runner.main: .orz/cloud.yaml:2: foo: unknown key, ignored\n"
           "2026-12-06 12:13:01,000 WARNING runner.main: sidecar ports [5432] still closed; going on without them\n")
    assert runner_log_for_users(log, init_log) == ("2026-12-06 12:13:01,000 WARNING runner.main: sidecar ports "
                                                   "[5432] still closed; going on without them\n")
    assert runner_log_for_users(log) == log  # without an init log saying it, the runner log says it
