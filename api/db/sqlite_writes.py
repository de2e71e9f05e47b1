"""The aiosqlite dialect, with this process's write transactions taking turns through a WriteGate.

A connection takes its database's gate (api/db/write_gate.py) just before its first statement that
writes, and gives it back as soon as SQLite no longer has a transaction open on it: after COMMIT or
ROLLBACK, after an autocommit statement, or when the connection is closed. Reads never take it, so
they keep running beside the writer (WAL), and a session that only reads, or has committed, holds
nothing while it waits on other work (a provider call, a nested session).

Write transactions start with BEGIN IMMEDIATE (pysqlite's implicit BEGIN before the first INSERT,
UPDATE or DELETE): the write lock is taken at BEGIN, so no transaction can hold a read snapshot that a
later write would have to upgrade, which fails at once with "database is locked" if another writer
committed meanwhile. On one event loop the gate holder is the only writer, so its BEGIN IMMEDIATE does
not wait; writers in other processes still meet it in SQLite's busy handler (busy_timeout).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sqlite3
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import URL
from sqlalchemy.util import await_

from api.db.write_gate import WriteGate, gate_for

DRIVER = "orz_aiosqlite"
# Statements that write or open a transaction. SELECT, PRAGMA and EXPLAIN do not take the gate;
# COMMIT and ROLLBACK end what the gate covers.
_WRITE_KEYWORDS = frozenset({"insert", "update", "delete", "replace", "create", "drop", "alter", "savepoint", "begin"})
_FIRST_WORD = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*([a-zA-Z]+)", re.DOTALL)


@functools.lru_cache(maxsize=4096)
def is_write(statement: str) -> bool:
    """Does this SQL write or open a transaction? Decided by its first keyword, as pysqlite does."""
    match = _FIRST_WORD.match(statement)
    return bool(match) and match.group(1).lower() in _WRITE_KEYWORDS


def gate_key(url: URL) -> str | None:
    """What identifies the database file (None for a private in-memory database, which needs no gate)."""
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in database:
        return None
    if url.query.get("uri") in ("true", "1") or database.startswith("file:"):
        return database
    return os.path.realpath(database)


class GatedSQLiteDialect(SQLiteDialect_aiosqlite):
    """aiosqlite whose write transactions in one process never contend in SQLite itself."""

    supports_statement_cache = True

    def __init__(self, write_wait_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # How long a writer waits for the gate before failing the way SQLite's busy timeout would.
        self.write_wait_s = write_wait_s
        self._database: str | None = None
        self._gate_cache: tuple[asyncio.AbstractEventLoop, WriteGate] | None = None
        # Driver connection -> the gate it holds now.
        self._held: dict[object, WriteGate] = {}
        # Connections set to READ UNCOMMITTED (by id; forgotten when they close).
        self._read_uncommitted: set[int] = set()

    def create_connect_args(self, url: URL) -> Any:
        self._database = gate_key(url)
        return super().create_connect_args(url)

    def on_connect(self) -> Any:
        base = super().on_connect()

        def connect(dbapi_connection: Any) -> None:
            if base is not None:
                base(dbapi_connection)
            dbapi_connection.isolation_level = "IMMEDIATE"

        return connect

    def set_isolation_level(self, dbapi_connection: Any, level: Any) -> None:
        # As pysqlite's dialect does, except that its implicit BEGIN is IMMEDIATE (it sets "", a deferred
        # BEGIN). Done here rather than after super() so that resetting a connection that was lent out
        # for autocommit costs no extra round trip to the connection's thread.
        if level == "AUTOCOMMIT":
            dbapi_connection.isolation_level = None
            return
        dbapi_connection.isolation_level = "IMMEDIATE"
        # SQLite's only other level is READ UNCOMMITTED (a PRAGMA, one more round trip to the connection's
        # thread). Resetting after every autocommit read cost ~15% of a GET, so the PRAGMA runs only when
        # that level is asked for or has to be undone.
        uncommitted = level == "READ UNCOMMITTED"
        if uncommitted or id(dbapi_connection) in self._read_uncommitted:
            SQLiteDialect.set_isolation_level(self, dbapi_connection, level)
            if uncommitted:
                self._read_uncommitted.add(id(dbapi_connection))
            else:
                self._read_uncommitted.discard(id(dbapi_connection))

    # ---------------------------------------------------------------------------------- statements

    def do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        owner = self._enter(statement, context)
        try:
            super().do_execute(cursor, statement, parameters, context)
        except Exception:
            self._settle(owner)
            raise
        self._settle(owner)

    def do_execute_no_params(self, cursor: Any, statement: str, context: Any = None) -> None:
        owner = self._enter(statement, context)
        try:
            super().do_execute_no_params(cursor, statement, context)
        except Exception:
            self._settle(owner)
            raise
        self._settle(owner)

    def do_executemany(self, cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        owner = self._enter(statement, context)
        try:
            super().do_executemany(cursor, statement, parameters, context)
        except Exception:
            self._settle(owner)
            raise
        self._settle(owner)

    # A cancellation (BaseException) while a statement runs is not settled: SQLite may still be running
    # it in the connection's thread. The rollback or close that follows gives the gate back.

    # ------------------------------------------------------------------------- transaction ends

    def do_commit(self, dbapi_connection: Any) -> None:
        try:
            super().do_commit(dbapi_connection)
        finally:
            self._settle(dbapi_connection.driver_connection)

    def do_rollback(self, dbapi_connection: Any) -> None:
        try:
            super().do_rollback(dbapi_connection)
        finally:
            self._settle(dbapi_connection.driver_connection)

    def do_close(self, dbapi_connection: Any) -> None:
        self._read_uncommitted.discard(id(dbapi_connection))
        try:
            super().do_close(dbapi_connection)
        finally:
            self._drop(dbapi_connection.driver_connection)

    def do_terminate(self, dbapi_connection: Any) -> None:
        self._read_uncommitted.discard(id(dbapi_connection))
        try:
            super().do_terminate(dbapi_connection)
        finally:
            self._drop(dbapi_connection.driver_connection)

    # ------------------------------------------------------------------------------------ the gate

    def _enter(self, statement: str, context: Any) -> object | None:
        """Take the gate before a write; the driver connection if it holds the gate now, else None."""
        if self._database is None or context is None:
            return None
        owner = None
        if self._held:
            owner = context.root_connection.connection.driver_connection
            if owner in self._held:
                return owner
        if not (context.isinsert or context.isupdate or context.isdelete or context.isddl or is_write(statement)):
            return None
        if owner is None:
            owner = context.root_connection.connection.driver_connection
        gate = self._gate()
        if not gate.try_acquire(owner):
            try:
                await_(gate.acquire(owner, self.write_wait_s))
            except TimeoutError:
                # What SQLite's busy timeout raises, so callers see the error they always could.
                raise self.loaded_dbapi.OperationalError(
                    f"database is locked (waited {self.write_wait_s:g} s for this process's other writes)"
                ) from None
        self._held[owner] = gate
        return owner

    def _settle(self, owner: object | None) -> None:
        """Give the gate back once SQLite has no transaction open on this connection."""
        if owner is None or owner not in self._held or _in_transaction(owner):
            return
        self._drop(owner)

    def _drop(self, owner: object) -> None:
        gate = self._held.pop(owner, None)
        if gate is not None:
            gate.release_threadsafe(owner)

    def _gate(self) -> WriteGate:
        loop = asyncio.get_running_loop()
        cached = self._gate_cache
        if cached is not None and cached[0] is loop:
            return cached[1]
        assert self._database is not None
        gate = gate_for(self._database)
        self._gate_cache = (loop, gate)
        return gate


def _in_transaction(driver_connection: Any) -> bool:
    """SQLite's own answer (no round trip); a closed connection has nothing open."""
    try:
        return bool(driver_connection.in_transaction)
    except (ValueError, sqlite3.Error):
        return False


registry.register(f"sqlite.{DRIVER}", __name__, "GatedSQLiteDialect")
