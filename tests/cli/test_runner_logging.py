"""`orz runner` (the container entry point) logs JSON lines like every other service."""

from __future__ import annotations

import json
import logging
import sys

import pytest

import runner.main
from cli.services import runner_cmd


def test_orz_runner_logs_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fake_main() -> None:
        # What the real entry point does first: a basicConfig that must not undo the JSON handler.
        logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(message)s")
        logging.getLogger("runner.main").warning("heartbeat failed: %s", "connection refused")

    monkeypatch.setattr(runner.main, "main", fake_main)
    monkeypatch.setenv("ORZ_LOG_JSON", "true")
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        runner_cmd.main(args=[], standalone_mode=False)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines
    entry = json.loads(lines[-1])
    assert entry["logger"] == "runner.main" and entry["msg"] == "heartbeat failed: connection refused"
