"""Run and inspect Alembic migrations from code (`orz admin migrate`, start-up checks, tests).

Rollbacks and rolling upgrades run old code on a newer schema. Each migration declares
``expand_only``: True when code written for the revision before it keeps working on it. After every
run, `orz admin migrate` records in ``schema_compat`` which code heads may run on the schema it left:
the current revision and, back through consecutive expand-only migrations, the older ones. The start
check accepts this code's exact head, or a schema that lists it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import delete, insert, inspect, select, text
from sqlalchemy.engine import Connection

import migrations
from api.db.engine import create_engine, is_connection_failure, is_sqlite, normalize_url
from api.db.models import SchemaCompat
from api.errors import SchemaNotAtHead

log = logging.getLogger(__name__)

UPGRADE_COMMAND = "orz admin migrate"
# pg_advisory_lock key serialising `orz admin migrate` runs (two API Pods start at once): "orzm".
LOCK_KEY = 0x6F727A6D
# One lock per database (the key space is the whole PostgreSQL server).
LOCK_SQL = ":k, hashtext(current_database())"
MAX_BACKOFF_S = 10.0


class MigrationError(RuntimeError):
    """`orz admin migrate` could not (or must not) run; the message says why and what to do."""


def alembic_config(database_url: str, script_location: Path | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location or Path(migrations.__file__).parent))
    # Percent signs in passwords would be read as interpolation by ConfigParser.
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return cfg


def script_directory(database_url: str, script_location: Path | None = None) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(database_url, script_location))


def upgrade(database_url: str, revision: str = "head", script_location: Path | None = None) -> None:
    command.upgrade(alembic_config(database_url, script_location), revision)


def downgrade(database_url: str, revision: str, script_location: Path | None = None) -> None:
    command.downgrade(alembic_config(database_url, script_location), revision)


def head_revision(database_url: str, script_location: Path | None = None) -> str | None:
    return script_directory(database_url, script_location).get_current_head()


def expand_only(script: Script) -> bool:
    value = getattr(script.module, "expand_only", None)
    if not isinstance(value, bool):
        raise MigrationError(f"migration {script.revision} must declare `expand_only: bool = True|False`")
    return value


def compatible_heads(scripts: ScriptDirectory, revision: str) -> list[str]:
    """`revision` and the older code heads that run on its schema: back through expand-only migrations."""
    heads = [revision]
    current = scripts.get_revision(revision)
    while current is not None and expand_only(current) and isinstance(current.down_revision, str):
        heads.append(current.down_revision)
        current = scripts.get_revision(current.down_revision)
    return heads


def _known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except CommandError:
        return False


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    compatible: frozenset[str]  # code heads recorded as able to run on `current`


def _schema_state(conn: Connection) -> SchemaState:
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None or not inspect(conn).has_table(SchemaCompat.__tablename__):
        return SchemaState(current, frozenset())
    rows = conn.execute(select(SchemaCompat.head).where(SchemaCompat.schema_revision == current)).scalars()
    return SchemaState(current, frozenset(rows))


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _record_compatible(conn: Connection, heads: list[str]) -> None:
    if not heads or not inspect(conn).has_table(SchemaCompat.__tablename__):
        return
    conn.execute(delete(SchemaCompat))
    conn.execute(insert(SchemaCompat), [{"schema_revision": heads[0], "head": h} for h in heads])


async def read_schema_state(database_url: str) -> SchemaState:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_schema_state)
    finally:
        await engine.dispose()


async def current_revision(database_url: str) -> str | None:
    return (await read_schema_state(database_url)).current


def refusal(current: str | None, head: str | None, scripts: ScriptDirectory) -> str:
    """Why this code cannot run on the schema at `current`, naming the command that fixes it."""
    if current is None:
        return (f"database schema is at nothing (empty database), this version needs {head}; "
                f"run `{UPGRADE_COMMAND}` to create it")
    if _known(scripts, current):
        return f"database schema is at {current}, this version needs {head}; run `{UPGRADE_COMMAND}` to upgrade it"
    return (f"database schema is at {current}, newer than this version ({head}) and not compatible with it; "
            f"run the newer version, or roll the schema back with its `{UPGRADE_COMMAND} --revision {head}`")


async def ensure_at_head(database_url: str, script_location: Path | None = None) -> None:
    """Refuse to serve from a schema this code was not written for (a compatible newer one is fine)."""
    state = await read_schema_state(database_url)
    scripts = script_directory(database_url, script_location)
    head = scripts.get_current_head()
    if state.current == head:
        return
    if head is not None and head in state.compatible:
        log.info("database schema is at %s, ahead of this version's %s and compatible with it",
                 state.current, head)
        return
    raise SchemaNotAtHead(refusal(state.current, head, scripts))


async def _retry(what: str, attempt: Callable[[], Awaitable[None]], wait_s: float,
                 retry_on: Callable[[BaseException], bool]) -> None:
    """Run `attempt` until it succeeds or `wait_s` has passed, backing off; the last error is raised."""
    deadline = time.monotonic() + wait_s
    delay = 1.0
    while True:
        try:
            await attempt()
            return
        except Exception as exc:
            left = deadline - time.monotonic()
            if not retry_on(exc) or left <= 0:
                raise
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            log.warning("waiting for %s: %s; next try in %.0f s (giving up in %.0f s)", what, reason,
                        min(delay, left), left)
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, MAX_BACKOFF_S)


async def wait_for_schema(database_url: str, wait_s: float, script_location: Path | None = None) -> None:
    """ensure_at_head, retried for up to `wait_s` while the database is down or its schema not ready."""
    await _retry("the database schema", lambda: ensure_at_head(database_url, script_location), wait_s,
                 lambda exc: isinstance(exc, SchemaNotAtHead) or is_connection_failure(exc))


async def wait_for_database(database_url: str, wait_s: float) -> None:
    """Return once the database answers; MigrationError after `wait_s` of trying."""
    async def ping() -> None:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    try:
        await _retry("the database to answer", ping, wait_s, is_connection_failure)
    except Exception as exc:
        if not is_connection_failure(exc):
            raise
        raise MigrationError(f"the database did not answer within {wait_s:.0f} s: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None


@dataclass(frozen=True)
class Step:
    """One migration a run applied (or rolled back): its revision and the first line of its docstring."""

    revision: str
    doc: str
    rolled_back: bool = False


@dataclass(frozen=True)
class MigrateResult:
    before: str | None
    after: str | None
    action: Literal["migrated", "ahead"]
    steps: tuple[Step, ...] = ()


def _steps(scripts: ScriptDirectory, before: str | None, after: str | None) -> tuple[Step, ...]:
    """The migrations between two revisions of one line of history, in the order they ran."""
    if before == after:
        return ()

    def walk(upper: str, lower: str | None, rolled_back: bool) -> list[Step]:
        return [Step(s.revision, next(iter((s.doc or "").strip().splitlines()), ""), rolled_back)
                for s in scripts.iterate_revisions(upper, lower or "base")]

    if after is not None and (before is None or not _is_downgrade(scripts, before, after)):
        return tuple(reversed(walk(after, before, False)))
    assert before is not None
    return tuple(walk(before, after, True))


def _is_downgrade(scripts: ScriptDirectory, current: str | None, target: str) -> bool:
    if target.startswith("-") or target == "base":
        return True
    if current is None or target in ("head", "heads", current):
        return False
    try:
        list(scripts.iterate_revisions(current, target))  # target is an ancestor of current
    except (CommandError, RevisionError):  # alembic says "not an ancestor" with a RevisionError
        return False
    return True


async def migrate(database_url: str, *, revision: str = "head", wait_s: float = 120,
                  script_location: Path | None = None) -> MigrateResult:
    """`orz admin migrate`: wait for the database, take the migration lock, move the schema, record
    which code heads may run on it. A schema already ahead of this code and compatible is left alone."""
    await wait_for_database(database_url, wait_s)
    scripts = script_directory(database_url, script_location)
    head = scripts.get_current_head()
    engine = create_engine(database_url)
    locking = not is_sqlite(database_url)  # SQLite is the single-node embedded default
    try:
        async with engine.connect() as lock:
            if locking:
                got = (await lock.execute(text(f"SELECT pg_try_advisory_lock({LOCK_SQL})"), {"k": LOCK_KEY})).scalar()
                if not got:
                    log.info("another `%s` is running on this database; waiting for it to finish", UPGRADE_COMMAND)
                    await lock.execute(text(f"SELECT pg_advisory_lock({LOCK_SQL})"), {"k": LOCK_KEY})
                await lock.commit()  # the session-level lock outlives the transaction
            try:
                state = await lock.run_sync(_schema_state)
                await lock.commit()
                if state.current is not None and not _known(scripts, state.current):
                    if revision == "head" and head in state.compatible:
                        return MigrateResult(state.current, state.current, "ahead")
                    raise MigrationError(refusal(state.current, head, scripts))
                move = downgrade if _is_downgrade(scripts, state.current, revision) else upgrade
                await asyncio.to_thread(move, database_url, revision, script_location)
                after = await lock.run_sync(_current)
                if after is not None:
                    await lock.run_sync(_record_compatible, compatible_heads(scripts, after))
                await lock.commit()
                return MigrateResult(state.current, after, "migrated", _steps(scripts, state.current, after))
            finally:
                if locking:
                    await lock.execute(text(f"SELECT pg_advisory_unlock({LOCK_SQL})"), {"k": LOCK_KEY})
                    await lock.commit()
    finally:
        await engine.dispose()
