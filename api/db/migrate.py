"""Run and inspect Alembic migrations from code (`orz admin migrate`, start-up checks, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

import migrations
from api.db.engine import create_engine, normalize_url
from api.errors import SchemaNotAtHead

UPGRADE_COMMAND = "orz admin migrate"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # Percent signs in passwords would be read as interpolation by ConfigParser.
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


async def current_revision(database_url: str) -> str | None:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current)
    finally:
        await engine.dispose()


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def ensure_at_head(database_url: str) -> None:
    """Refuse to serve from a schema this code was not written for."""
    current = await current_revision(database_url)
    head = head_revision(database_url)
    if current != head:
        raise SchemaNotAtHead(
            f"database schema is at {current or 'nothing (empty database)'}, this version needs {head}; "
            f"run `{UPGRADE_COMMAND}` to upgrade it"
        )

