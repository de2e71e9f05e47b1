"""`orz server` makes its data dir (keys, database, sessions, logs) for its own user alone, whatever the umask:
the log's `mkdir -p` used to make it 0755, listable by every account on the machine."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.settings import Settings
from tests.cli.test_server_screen import screen

__all__ = ["screen"]


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    old = os.umask(0o022)
    try:
        yield Settings(data_dir=tmp_path / "new" / "orzbob")
    finally:
        os.umask(old)


def test_a_new_data_dir_is_the_servers_alone(settings: Settings, screen: io.StringIO) -> None:
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((settings.data_dir / "logs").stat().st_mode) == 0o700
