"""On SQLite this process's write transactions take turns in the write gate, never in SQLite's busy handler.

SQLite's own statement trace shows when each connection begins and ends a write transaction; a write
transaction that begins while another connection has one open is one that SQLite would make wait in
its busy handler (which sleeps 1, 2, 5 ... 100 ms steps instead of waking the writer).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sqlite3
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import event, exc, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api import admin
from api.app import create_app
from api.db.engine import create_engine, is_connection_failure, session_factory
from api.db.models import Org
from api.db.sqlite_writes import GatedSQLiteDialect, gate_key, is_write
from api.db.write_gate import WriteDeadlock, gate_for
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from tests.conftest import make_tenant

CREATES = 32
# Bounds a hang (a deadlock would otherwise take the whole test timeout); no test asserts a duration.
HANG_GUARD_S = 20


class WriteTracer:
    """Counts write transactions, and those that began while another connection had one open."""

    _WRITES = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})

    def __init__(self) -> None:
        self._lock = threading.Lock()  # trace callbacks run on each connection's own thread
        self._ids = itertools.count()
        self._open: set[int] = set()
        self.writes = 0
        self.overlapping = 0

    def install(self, engine: AsyncEngine) -> None:
        """Trace every connection the engine opens from now on."""
        event.listen(engine.sync_engine, "connect", self._connect)

    def _connect(self, dbapi_connection: object, _record: object) -> None:
        trace = functools.partial(self._statement, next(self._ids))
        dbapi_connection.run_async(lambda conn: conn.set_trace_callback(trace))  # type: ignore[attr-defined]

    def _statement(self, conn_id: int, sql: str) -> None:
        word = (sql.split(None, 1) or [""])[0].upper()
        with self._lock:
            # BEGIN opens a write transaction (pysqlite begins only before writes); a write outside
            # one is a transaction of its own (autocommit).
            if word == "BEGIN" or (word in self._WRITES and conn_id not in self._open):
                self.writes += 1
                if self._open - {conn_id}:
                    self.overlapping += 1
                if word == "BEGIN":
                    self._open.add(conn_id)
            elif word in ("COMMIT", "ROLLBACK", "END"):
                self._open.discard(conn_id)


@pytest.fixture
async def server(settings) -> AsyncIterator[ApiServer]:
    srv = await ApiServer.start(create_app(settings, provider=FakeProvider()), "127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


async def test_concurrent_creates_all_succeed_and_never_wait_in_sqlite(server, sessions):
    tenants = [await make_tenant(sessions, f"org-{n}") for n in range(CREATES)]
    engine = server.app.ctx.state.engine
    tracer = WriteTracer()
    tracer.install(engine)
    await engine.dispose()  # every connection the creates use is opened (and traced) from here on
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=60,
                                 limits=httpx.Limits(max_connections=CREATES)) as http:
        responses = await asyncio.gather(*[
            http.post("/v1/instances", json={"repo_url": "https://example.com/a/repo.git"}, headers=t.headers)
            for t in tenants
        ])
    assert [r.status_code for r in responses] == [201] * CREATES
    # Each create wrote (its transaction, the token's last use, the provider state), all seen here...
    assert tracer.writes >= 2 * CREATES
    # ...and none of them began while another was open, so none waited in SQLite's busy handler.
    assert tracer.overlapping == 0


async def _names(sessions: async_sessionmaker[AsyncSession]) -> set[str]:
    async with sessions() as db:
        return set(await db.scalars(select(Org.name)))


async def test_a_session_that_read_or_committed_does_not_block_a_nested_writer(sessions):
    async def nested() -> None:
        async with sessions() as outer:
            # The outer session holds a connection in a transaction that only read so far...
            await outer.scalar(select(Org.id).limit(1))
            async with sessions() as inner:  # ...so a second session in the same task can write,
                inner.add(Org(name="inner"))
                await inner.commit()
            outer.add(Org(name="outer"))  # and the outer one writes after that commit (BEGIN IMMEDIATE:
            await outer.commit()  # no stale read snapshot to upgrade, no "database is locked")
            async with sessions() as again:  # the outer one committed: it holds nothing any more
                again.add(Org(name="again"))
                await again.commit()

    await asyncio.wait_for(nested(), HANG_GUARD_S)
    assert await _names(sessions) == {"inner", "outer", "again"}


async def test_a_nested_write_while_the_outer_write_is_open_fails_at_once_instead_of_hanging(sessions):
    async def nested() -> None:
        async with sessions() as outer:
            outer.add(Org(name="outer"))
            await outer.flush()  # a write transaction is open on the outer session's connection
            async with sessions() as inner:
                inner.add(Org(name="inner"))
                with pytest.raises(WriteDeadlock):
                    await inner.flush()
            await outer.commit()

    await asyncio.wait_for(nested(), HANG_GUARD_S)
    assert await _names(sessions) == {"outer"}


async def test_engines_on_one_file_share_the_gate_and_a_cancelled_waiter_passes_it_on(settings):
    first, second = create_engine(settings.database_url), create_engine(settings.database_url)
    gate = gate_for(gate_key(first.url))  # type: ignore[arg-type]

    async def add(engine: AsyncEngine, name: str) -> None:
        async with session_factory(engine)() as db:
            db.add(Org(name=name))
            await db.commit()

    try:
        async with asyncio.timeout(HANG_GUARD_S):
            async with session_factory(first)() as holder:
                holder.add(Org(name="first"))
                await holder.flush()
                queued = gate.queued
                waiting = [asyncio.create_task(add(second, f"second-{n}")) for n in range(3)]
                while gate.queued < queued + 3:
                    await asyncio.sleep(0.005)
                waiting[1].cancel()
                await holder.commit()
            results = await asyncio.gather(*waiting, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert results[0] is None and results[2] is None
        assert gate.holder is None
        assert await _names(session_factory(first)) == {"first", "second-0", "second-2"}
    finally:
        await first.dispose()
        await second.dispose()


async def test_a_writer_cancelled_mid_transaction_gives_the_gate_back(sessions):
    wrote = asyncio.Event()

    async def stuck() -> None:
        async with sessions() as db:
            db.add(Org(name="stuck"))
            await db.flush()
            wrote.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(stuck())
    await wrote.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(admin.create_org(sessions, "after"), HANG_GUARD_S)
    assert await _names(sessions) == {"after"}


async def test_a_writer_that_waits_too_long_fails_as_a_busy_timeout_would(settings):
    engine = create_engine(settings.database_url, write_wait_s=0.05)
    sessions = session_factory(engine)
    try:
        async with sessions() as holder:
            holder.add(Org(name="holder"))
            await holder.flush()
            other = asyncio.create_task(admin.create_org(sessions, "other"))
            with pytest.raises(exc.OperationalError, match="database is locked") as raised:
                await asyncio.wait_for(other, HANG_GUARD_S)
            assert is_connection_failure(raised.value)  # the API answers 503, as for SQLite's own timeout
            await holder.commit()
        assert await _names(sessions) == {"holder"}
    finally:
        await engine.dispose()


async def test_a_writer_in_another_process_is_still_waited_for_in_sqlites_busy_handler(settings, sessions):
    # A plain sqlite3 connection knows nothing of this process's gate, like a second `orz api` on the file.
    other = sqlite3.connect(make_url(settings.database_url).database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO orgs (id, name, plan, quota_serial, created_at) "
                      "VALUES ('org_other', 'other', 'free', 0, '2024-01-01 00:00:00')")
        write = asyncio.create_task(admin.create_org(sessions, "ours"))
        await asyncio.sleep(0.2)
        assert not write.done()  # it cannot finish while the other process holds the write lock...
        other.execute("COMMIT")
        await asyncio.wait_for(write, HANG_GUARD_S)  # ...and it waited for it instead of failing
    finally:
        other.close()
    assert await _names(sessions) == {"other", "ours"}


def test_postgres_engines_are_not_gated():
    engine = create_engine("postgresql://orz@127.0.0.1:5432/orz")
    assert engine.dialect.name == "postgresql"
    assert not isinstance(engine.dialect, GatedSQLiteDialect)


@pytest.mark.parametrize(("statement", "writes"), [
    ("SELECT 1", False),
    ("  select * from instances", False),
    ("PRAGMA read_uncommitted = 0", False),
    ("WITH x AS (SELECT 1) SELECT * FROM x", False),
    ("INSERT INTO orgs VALUES (?)", True),
    ("\n  UPDATE orgs SET plan = ?", True),
    ("delete from used_jtis", True),
    ("REPLACE INTO t VALUES (1)", True),
    ("-- a comment\nINSERT INTO t VALUES (1)", True),
    ("/* hint */ UPDATE t SET a = 1", True),
    ("CREATE TABLE t (a)", True),
    ("BEGIN IMMEDIATE", True),
    ("SAVEPOINT sa_savepoint_1", True),
    ("COMMIT", False),
])
def test_which_statements_take_the_gate(statement: str, writes: bool) -> None:
    assert is_write(statement) is writes


async def test_read_uncommitted_still_applies_and_is_undone_for_the_next_user(settings):
    engine = create_engine(settings.database_url, pool_size=1, max_overflow=0)  # one connection, reused
    try:
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA read_uncommitted")).scalar() == 0
        dirty = engine.execution_options(isolation_level="READ UNCOMMITTED")
        async with dirty.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA read_uncommitted")).scalar() == 1
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        async with autocommit.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA read_uncommitted")).scalar() == 0
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA read_uncommitted")).scalar() == 0
    finally:
        await engine.dispose()
