"""The SQLite database holds every org's users, sessions, events and terminal recordings: only the server's
user reads it, whatever the umask. (Before, `orz server` made it 0644 in a data dir `mkdir -p` had made 0755
for the log: any account on a shared machine could read every tenant's recordings.)"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from api.db import migrate
from api.db.engine import create_engine


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(db: Path) -> dict[str, str]:
    found = {}
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        with contextlib.suppress(FileNotFoundError):
            found[path.name] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


@pytest.mark.usefixtures("umask_022")
async def test_the_database_and_its_wal_are_the_servers_alone(tmp_path: Path) -> None:
    db = tmp_path / "data" / "orz.db"
    url = f"sqlite+aiosqlite:///{db}"
    await migrate.migrate(url, wait_s=5)
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:  # a write: the WAL and its index are there while it is open
            await conn.execute(text("CREATE TABLE probe (x INTEGER)"))
            seen = modes(db)
    finally:
        await engine.dispose()
    assert "orz.db-wal" in seen, seen
    assert set(seen.values()) == {"0o600"}, seen


@pytest.mark.usefixtures("umask_022")
async def test_a_database_others_could_read_is_made_the_servers_alone(tmp_path: Path) -> None:
    db = tmp_path / "orz.db"
    url = f"sqlite+aiosqlite:///{db}"
    await migrate.migrate(url, wait_s=5)
    db.chmod(0o644)  # made by an earlier version
    await migrate.wait_for_database(url, wait_s=5)  # the server's first connection at start
    assert modes(db)["orz.db"] == "0o600"
