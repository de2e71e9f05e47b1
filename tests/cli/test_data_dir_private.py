"""`orz server` makes its data dir (keys, database, sessions, logs) for its own user alone, whatever the umask:
the log's `mkdir -p` used to make it 0755, listable by every account on the machine."""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.settings import Settings
from tests.cli.test_server_screen import screen

__all__ = ["screen"]
started = contextlib.contextmanager(screen.__wrapped__)  # the server's logging, as `orz server` starts it


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


def test_an_existing_listable_data_dir_is_made_the_servers_alone(tmp_path: Path) -> None:
    """A data dir an earlier version (or a `mkdir`) left 0755 is 0700 once the server has started."""
    data_dir = tmp_path / "orzbob"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    settings = Settings(data_dir=data_dir)
    with started(settings) as terminal:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert "data dir" not in terminal.getvalue()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the directory to another user needs root")
def test_a_data_dir_someone_else_owns_is_left_alone_with_a_warning(tmp_path: Path) -> None:
    data_dir = tmp_path / "orzbob"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    (data_dir / "logs").mkdir(mode=0o700)
    os.chown(data_dir, 54321, 54321)
    settings = Settings(data_dir=data_dir)
    with started(settings) as terminal:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755
        said = terminal.getvalue()
        assert "warning" in said and str(data_dir) in said and "0755" in said, said
