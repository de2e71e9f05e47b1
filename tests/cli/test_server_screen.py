"""What `orz server` shows on its terminal of what sessions report (cli/server_log.py)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from api import schemas
from api.settings import Settings
from cli import server_log
from tests.api.lifecycle_support import principal
from tests.cli.conftest import LiveApi


@pytest.fixture
def screen(settings: Settings) -> Iterator[io.StringIO]:
    """The server's terminal while the test runs (the root logger as it was afterwards)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    terminal = io.StringIO()
    server_log.configure(settings, terminal)
    added = [h for h in root.handlers if h not in handlers]
    try:
        yield terminal
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
            if isinstance(handler, logging.StreamHandler) and handler.stream is not terminal:
                handler.stream.close()  # the log file configure opened
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def test_a_runners_escape_sequences_do_not_reach_the_operators_terminal(live_api: LiveApi,
                                                                        screen: io.StringIO) -> None:
    # Any org's session (its runner, or the agent holding its token) reports text the operator's terminal
    # prints: an OSC 52 clipboard write or a title change there must arrive inert.
    state = live_api.app.ctx.state
    state.instances.on_transition.append(server_log.session_event)  # as orz server does
    who = live_api.call(principal(state.sessions, "tenant"))
    sid = live_api.call(state.instances.create(who, schemas.InstanceCreate(program="bash"))).id
    hostile = "done\x1b]52;c;cm0gLXJmIH4=\x07\x1b]0;owned\x07\x9b2J"
    live_api.heartbeat(sid, program_events=[schemas.ProgramEvent(kind="program_exited", message=hostile)])
    live_api.heartbeat(sid, fatal_error=hostile)
    shown = screen.getvalue()
    assert f"session {sid}: done\ufffd]52;c;cm0gLXJmIH4=\ufffd" in shown  # the program event
    assert "-> failed (done\ufffd]52;c;" in shown  # the failure, with its reason
    assert not any(ch in shown for ch in "\x1b\x07\x9b"), repr(shown)
