"""Async engine and session factory for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from api.db import sqlite_writes

# How long a SQLite writer waits for the write lock: for this process's other writers in the write
# gate (api/db/write_gate.py), for other processes' in SQLite's busy handler.
SQLITE_BUSY_TIMEOUT_S = 30


def normalize_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://, sqlite://) and pick the async driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


def is_connection_failure(error: BaseException) -> bool:
    """True for errors that mean "the database is unreachable or dropped us", not "the query is wrong"."""
    if isinstance(error, exc.DBAPIError):
        return bool(error.connection_invalidated) or isinstance(error, (exc.OperationalError, exc.InterfaceError))
    # Pool exhausted, or the driver failed to open a socket (asyncpg raises OSError subclasses directly).
    return isinstance(error, (exc.TimeoutError, ConnectionError, TimeoutError))


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    url = normalize_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            _private_database_file(Path(database))
        # Few connections: each is a thread (aiosqlite) contending for the GIL; measured (when writers
        # still met in SQLite's busy handler), 2-4 beat 32 on both throughput and tail latency.
        # The overflow is for code that holds one session while opening another.
        kwargs.setdefault("pool_size", 4)
        kwargs.setdefault("max_overflow", 16)
        kwargs.setdefault("write_wait_s", SQLITE_BUSY_TIMEOUT_S)
        # The gated dialect makes this process's write transactions take turns instead of meeting in
        # SQLite's busy handler, which sleeps rather than waking the next writer when the lock frees.
        gated = make_url(url).set(drivername=f"sqlite+{sqlite_writes.DRIVER}")
        engine = create_async_engine(gated, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # SQLAlchemy's pre-ping on asyncpg costs three round trips per checkout (BEGIN, ping, ROLLBACK:
    # a third of a primary-key read here). A connection the server closed (restart, failover,
    # pg_terminate_backend, idle timeout) is already marked closed by the time it is checked out, so a
    # local check finds it for free; the rare one that dies unannounced fails its request with a 503.
    kwargs.setdefault("pool_pre_ping", False)
    # What the local check cannot see is a connection a firewall or NAT dropped silently while idle;
    # those drop flows idle for an hour or more, so no pooled connection is used past 30 minutes.
    kwargs.setdefault("pool_recycle", 1800)
    # Overflow connections are closed when returned, so a burst above pool_size opens and closes a
    # connection per request (measured: 1.1k instead of 1.8k req/s at 32 concurrent requests). Keep the
    # steady-state pool large enough for the concurrency one API process sees.
    kwargs.setdefault("pool_size", 32)
    kwargs.setdefault("max_overflow", 8)
    engine = create_async_engine(url, **kwargs)
    event.listen(engine.sync_engine, "checkout", _discard_closed_connection)
    event.listen(engine.sync_engine, "handle_error", _connect_failure_is_disconnect)
    return engine


def _private_database_file(database: Path) -> None:
    """Make the SQLite file (every org's users, sessions and recordings) readable by this user alone,
    whatever the umask: created 0600 before SQLite makes it, which gives its WAL and index the same mode;
    one an earlier version left readable by others is made so too."""
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        with contextlib.suppress(OSError):  # absent, or not ours to change
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:
                os.chmod(path, mode & 0o700)


def _connect_failure_is_disconnect(context: Any) -> None:
    """A failure to open a connection (server down, starting up, refusing connections) is an outage."""
    if context.connection is None and isinstance(context.sqlalchemy_exception, exc.DBAPIError):
        context.is_disconnect = True


def _discard_closed_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Make the pool replace a pooled connection the server has already closed (no round trip)."""
    driver_connection = getattr(dbapi_connection, "driver_connection", None)
    is_closed = getattr(driver_connection, "is_closed", None)
    if is_closed is not None and is_closed():
        # The pool catches this, drops the connection and checks out (or opens) another one.
        raise exc.DisconnectionError("the database closed this pooled connection")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the single writer; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # In WAL mode NORMAL cannot corrupt the database; it may lose the last commits on power loss,
    # which is the right trade for the embedded default (a commit no longer waits for an fsync).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def autocommit_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for work that is one statement (a read, a one-row UPDATE): autocommit makes each statement
    its own transaction and skips the BEGIN and COMMIT/ROLLBACK round trips. Never for multi-statement work."""
    return async_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False)
