"""Failed authentications per source address, counted in the database so every gateway replica shares one
limit (``auth_fail_limit`` per ``auth_fail_window_s``) instead of each allowing its own.

Counts go into time buckets (a sixth of the window each); the window is the last six buckets, so a burst
is forgotten between 5/6 and all of a window after it. A replica that sees a failure reports it and
learns the shared count: at the limit it refuses that source for ``retry_after_s``. A source blocked on
one replica gets one more try on each other replica before they know (the first failure there tells).
"""

from __future__ import annotations

import math
import time

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.db.dialect import insert_for
from api.db.models import AuthFailure
from api.settings import Settings

BUCKETS_PER_WINDOW = 6


def bucket_s(settings: Settings) -> int:
    return max(1, math.ceil(settings.auth_fail_window_s / BUCKETS_PER_WINDOW))


async def record(sessions: async_sessionmaker[AsyncSession], source: str, settings: Settings,
                 now: float | None = None) -> schemas.AuthFailureReply:
    """Count one failure from `source`; the failures inside the window and how long the source must wait."""
    t = time.time() if now is None else now
    size = bucket_s(settings)
    current = int(t // size)
    first = current - BUCKETS_PER_WINDOW + 1
    async with sessions() as db:
        insert = insert_for(db)(AuthFailure).values(source=source, bucket=current, count=1)
        await db.execute(insert.on_conflict_do_update(index_elements=["source", "bucket"],
                                                      set_={"count": AuthFailure.count + 1}))
        buckets = (await db.execute(
            select(AuthFailure.bucket, AuthFailure.count)
            .where(AuthFailure.source == source, AuthFailure.bucket >= first)
            .order_by(AuthFailure.bucket))).all()
        await db.commit()
    failures = sum(int(count) for _, count in buckets)
    retry_after = 0
    if failures >= settings.auth_fail_limit:
        # Until enough of the oldest buckets leave the window to bring the count under the limit.
        remaining = failures
        for bucket, count in buckets:
            remaining -= int(count)
            if remaining < settings.auth_fail_limit:
                retry_after = max(1, math.ceil((bucket + BUCKETS_PER_WINDOW) * size - t))
                break
    return schemas.AuthFailureReply(failures=failures, limit=settings.auth_fail_limit, retry_after_s=retry_after)


async def purge(db: AsyncSession, settings: Settings, now: float | None = None) -> int:
    """Forget buckets that left the window (the scheduler's purge job)."""
    t = time.time() if now is None else now
    oldest = int(t // bucket_s(settings)) - BUCKETS_PER_WINDOW + 1
    result = await db.execute(delete(AuthFailure).where(AuthFailure.bucket < oldest))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def count(sessions: async_sessionmaker[AsyncSession], source: str) -> int:
    """Every failure recorded for `source` (tests and operators)."""
    async with sessions() as db:
        return int(await db.scalar(select(func.coalesce(func.sum(AuthFailure.count), 0))
                                   .where(AuthFailure.source == source)) or 0)
