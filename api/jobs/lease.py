"""Leader lease in the database: exactly one scheduler replica acts at a time.

The lease is one ``scheduler_leases`` row (name, holder, expires_at). A replica takes it with a
conditional UPDATE that only matches when the row is its own or has expired, and creates the row with
an INSERT ... ON CONFLICT DO NOTHING, whose primary key lets only one creator succeed. Both are atomic
on SQLite (one writer) and on PostgreSQL (the UPDATE re-checks its WHERE clause after waiting for a
concurrent writer's row lock), so two replicas can never both believe they hold an unexpired lease.
A holder that dies simply stops renewing; another replica takes over once ``expires_at`` has passed.
Replicas compare against their own clocks, so keep them in sync (NTP); skew eats into the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db.base import utcnow
from api.db.models import SchedulerLease

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def default_holder_id() -> str:
    """Unique per process and readable in the table: host, pid and a random suffix."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _insert_for(db: AsyncSession) -> Callable[..., Any]:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING on both supported databases."""
    return postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert


class Lease:
    """One named lease; ``acquire`` takes or renews it, ``held`` answers from memory."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        name: str,
        duration_s: float,
        holder: str | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.holder = holder or default_holder_id()
        self.duration = timedelta(seconds=duration_s)
        self.now = clock
        self._until: datetime | None = None

    @property
    def held_until(self) -> datetime | None:
        return self._until

    def held(self) -> bool:
        """True while the lease we last wrote has not expired (no database round trip)."""
        return self._until is not None and self.now() < self._until

    async def acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True when we hold it now."""
        now = self.now()
        until = now + self.duration
        async with self.sessions() as db:
            result = await db.execute(
                update(SchedulerLease)
                .where(
                    SchedulerLease.name == self.name,
                    or_(SchedulerLease.holder == self.holder, SchedulerLease.expires_at <= now),
                )
                .values(holder=self.holder, expires_at=until)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                await db.commit()
                return self._set(until)
            # No row matched: either someone else holds it, or nobody ever created it. ON CONFLICT DO
            # NOTHING lets exactly one creator win without an error in the server log on every tick.
            insert = _insert_for(db)(SchedulerLease).values(name=self.name, holder=self.holder, expires_at=until)
            created = await db.execute(insert.on_conflict_do_nothing(index_elements=["name"]))
            await db.commit()
            return self._set(until if created.rowcount == 1 else None)  # type: ignore[attr-defined]

    async def release(self) -> None:
        """Give the lease up now (clean shutdown) so another replica need not wait for it to expire."""
        if self._until is None:
            return
        async with self.sessions() as db:
            await db.execute(
                update(SchedulerLease)
                .where(SchedulerLease.name == self.name, SchedulerLease.holder == self.holder)
                .values(expires_at=self.now())
            )
            await db.commit()
        self._set(None)

    def _set(self, until: datetime | None) -> bool:
        was_held = self._until is not None
        self._until = until
        if until is not None and not was_held:
            log.info("scheduler lease %s taken by %s", self.name, self.holder)
        elif until is None and was_held:
            log.info("scheduler lease %s lost by %s", self.name, self.holder)
        return until is not None
