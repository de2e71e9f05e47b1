"""One SQLite write transaction at a time per database file and event loop, handed over in arrival order.

SQLite has one write lock per database. A connection that finds it taken waits in SQLite's busy
handler, which sleeps in growing steps (1, 2, 5, 10 ... 100 ms) instead of being woken when the lock
frees, so concurrent writers in one process paid up to a sleep step each. Writers of this process
queue here instead: each waits on a future, and the writer before it hands the gate over the moment
its transaction ends. Other processes on the same file still meet in SQLite's busy handler.

Pure asyncio; the SQLite dialect (api/db/sqlite_writes.py) decides when a connection takes the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections import deque
from typing import Any


class WriteDeadlock(RuntimeError):
    """A task asked for the gate through one connection while it holds it through another.

    The second write could only start after the first transaction ends, which waits on this very task:
    it would hang. Commit (or roll back) the first session before writing through another.
    """


class WriteGate:
    """A FIFO lock for write transactions whose owner is a connection, not a task."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._holder: object | None = None
        self._holder_task: asyncio.Task[Any] | None = None
        self._waiters: deque[tuple[asyncio.Future[None], object, asyncio.Task[Any] | None]] = deque()
        # Counters for tests and debugging: how often the gate was taken, and how often a taker queued.
        self.acquired = 0
        self.queued = 0

    @property
    def holder(self) -> object | None:
        return self._holder

    def try_acquire(self, owner: object) -> bool:
        """Take the gate now if nobody holds it or queues for it (no await: the common, idle case)."""
        if self._holder is owner:
            return True
        if self._holder is None and not self._waiters:
            self._take(owner, asyncio.current_task())
            return True
        return False

    async def acquire(self, owner: object, timeout_s: float) -> None:
        """Wait in line until the gate is handed to ``owner``; TimeoutError after ``timeout_s``."""
        if self.try_acquire(owner):
            return
        task = asyncio.current_task()
        if task is not None and task is self._holder_task:
            raise WriteDeadlock(
                "this task already has a write transaction open on another connection to the same SQLite "
                "database; commit or roll it back before writing through a second session"
            )
        entry = (self.loop.create_future(), owner, task)
        self._waiters.append(entry)
        self.queued += 1
        try:
            async with asyncio.timeout(timeout_s):
                await entry[0]
        except BaseException:
            if entry[0].done() and not entry[0].cancelled():
                # Handed over just as the wait was given up (cancelled, timed out): pass it on.
                self.release(owner)
            else:
                with contextlib.suppress(ValueError):  # a release may already have dropped it
                    self._waiters.remove(entry)
            raise

    def release(self, owner: object) -> bool:
        """Hand the gate to the first live waiter; False (and nothing done) unless ``owner`` holds it."""
        if self._holder is not owner:
            return False
        self._holder = self._holder_task = None
        while self._waiters:
            future, next_owner, next_task = self._waiters.popleft()
            if not future.done():  # skip waits that were cancelled before their turn came
                self._take(next_owner, next_task)
                future.set_result(None)
                break
        return True

    def release_threadsafe(self, owner: object) -> None:
        """``release`` from any thread (a connection closed by the garbage collector, say)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.release(owner)
            return
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is left to hand it to
            self.loop.call_soon_threadsafe(self.release, owner)

    def _take(self, owner: object, task: asyncio.Task[Any] | None) -> None:
        self._holder, self._holder_task = owner, task
        self.acquired += 1


_registry_lock = threading.Lock()
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, WriteGate]] = weakref.WeakKeyDictionary()


def gate_for(database: str) -> WriteGate:
    """The gate of one database file on the running event loop; every engine on that file shares it.

    Per file, not per engine: `orz server` runs the API and the scheduler with an engine each on one
    loop. Per loop, because a future belongs to one loop (migrations run on a loop of their own).
    """
    loop = asyncio.get_running_loop()
    with _registry_lock:
        gates = _gates.setdefault(loop, {})
        gate = gates.get(database)
        if gate is None:
            gate = gates[database] = WriteGate(loop)
        return gate
