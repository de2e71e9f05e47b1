"""Leader lease in the database: exactly one scheduler replica acts at a time.

The lease is one ``scheduler_leases`` row (name, holder, expires_at, generation). A replica takes it with a
conditional UPDATE that only matches when the row is its own or has expired, and creates the row with
an INSERT ... ON CONFLICT DO NOTHING, whose primary key lets only one creator succeed. Both are atomic
on SQLite (one writer) and on PostgreSQL (the UPDATE re-checks its WHERE clause after waiting for a
concurrent writer's row lock), so two replicas can never both believe they hold an unexpired lease.

Time is the database's: on PostgreSQL expiry is written and compared with the server's
``clock_timestamp()``, so replicas whose clocks disagree still agree on who leads. A replica's own view
("do I still hold it?") runs on its monotonic clock from the moment it *asked*, which is never later
than the moment the database stamped, so it stops acting before anyone else may start. SQLite is one
machine, whose clock is the database's.

Each change of holder bumps ``generation``. The leader's writes are fenced: ``fence(db)`` in the same
transaction checks that this holder still has the same generation, unexpired, and on PostgreSQL locks the
row (FOR SHARE), so a takeover waits for that write to commit and a write by a deposed leader fails.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db.base import utcnow
from api.db.dialect import insert_for as _insert_for
from api.db.dialect import is_postgres as _postgres
from api.db.models import SchedulerLease

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class LeaseLost(Exception):
    """This replica no longer holds the lease it acted under: the write was fenced off."""


def default_holder_id() -> str:
    """Unique per process and readable in the table: host, pid and a random suffix."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """One named lease; ``acquire`` takes or renews it, ``held`` answers from memory, ``fence`` guards writes.

    ``clock`` replaces the database's clock (tests move time with it); by default the database decides.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        name: str,
        duration_s: float,
        holder: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.holder = holder or default_holder_id()
        self.duration = timedelta(seconds=duration_s)
        self.clock = clock
        self.generation: int | None = None
        self._until: datetime | None = None
        self._deadline: float | None = None  # time.monotonic() after which we no longer act

    def held(self) -> bool:
        """True while the lease we last wrote has not expired (no database round trip)."""
        if self._until is None:
            return False
        if self.clock is not None:
            return self.clock() < self._until
        return self._deadline is not None and time.monotonic() < self._deadline

    async def _now(self, db: AsyncSession) -> datetime:
        if self.clock is not None:
            return self.clock()
        if _postgres(db):
            stamped = await db.scalar(select(func.clock_timestamp()))
            assert isinstance(stamped, datetime)
            return stamped
        return utcnow()

    async def acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True when we hold it now."""
        asked = time.monotonic()
        async with self.sessions() as db:
            now = await self._now(db)
            until = now + self.duration
            taken = await db.scalar(
                update(SchedulerLease)
                .where(
                    SchedulerLease.name == self.name,
                    or_(SchedulerLease.holder == self.holder, SchedulerLease.expires_at <= now),
                )
                .values(holder=self.holder, expires_at=until,
                        generation=case((SchedulerLease.holder == self.holder, SchedulerLease.generation),
                                        else_=SchedulerLease.generation + 1))
                .returning(SchedulerLease.generation)
            )
            if taken is not None:
                await db.commit()
                return self._set(until, asked, int(taken))
            # No row matched: either someone else holds it, or nobody ever created it. ON CONFLICT DO
            # NOTHING lets exactly one creator win without an error in the server log on every tick.
            insert = _insert_for(db)(SchedulerLease).values(name=self.name, holder=self.holder, expires_at=until,
                                                            generation=1)
            created = await db.execute(insert.on_conflict_do_nothing(index_elements=["name"]))
            await db.commit()
            won = created.rowcount == 1  # type: ignore[attr-defined]
            return self._set(until if won else None, asked, 1)

    async def fence(self, db: AsyncSession) -> None:
        """Raise LeaseLost unless this replica still holds the lease, same generation, by the database's time.

        Call inside the transaction of a write made as leader, before the write.
        """
        if self.generation is None or not self.held():
            raise LeaseLost(f"scheduler lease {self.name} is not held by {self.holder}")
        check = select(SchedulerLease.generation).where(
            SchedulerLease.name == self.name, SchedulerLease.holder == self.holder,
            SchedulerLease.generation == self.generation, SchedulerLease.expires_at > await self._now(db))
        if _postgres(db):
            check = check.with_for_update(read=True)
        if await db.scalar(check) is None:
            self._set(None, 0.0, None)
            raise LeaseLost(f"scheduler lease {self.name} moved on from {self.holder}")

    async def release(self) -> None:
        """Give the lease up now (clean shutdown) so another replica need not wait for it to expire."""
        if self._until is None:
            return
        async with self.sessions() as db:
            await db.execute(
                update(SchedulerLease)
                .where(SchedulerLease.name == self.name, SchedulerLease.holder == self.holder)
                .values(expires_at=await self._now(db))
            )
            await db.commit()
        self._set(None, 0.0, None)

    def _set(self, until: datetime | None, asked: float, generation: int | None) -> bool:
        was_held = self._until is not None
        self._until = until
        self._deadline = asked + self.duration.total_seconds() if until is not None else None
        self.generation = generation if until is not None else None
        if until is not None and not was_held:
            log.info("scheduler lease %s taken by %s (generation %s)", self.name, self.holder, generation)
        elif until is None and was_held:
            log.info("scheduler lease %s lost by %s", self.name, self.holder)
        return until is not None
