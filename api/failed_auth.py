"""Failed authentications per source address, counted in the database so every gateway replica shares one
limit (``auth_fail_limit`` per ``auth_fail_window_s``) instead of each allowing its own.

Counts go into time buckets (a sixth of the window each); the window is the last six buckets, so a burst
is forgotten between 5/6 and all of a window after it. A replica that sees a failure reports it and
learns the shared count: at the limit it refuses that source for ``retry_after_s``. A source blocked on
one replica gets one more try on each other replica before they know (the first failure there tells).

The unauthenticated sign-in routes (api/routes/auth.py) count their attempts here too, under a source
key of their own (``signin_source``) and their own limit, in the same window, table and purge.
"""

from __future__ import annotations

import math
import time

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.addresses import limit_key
from api.db.dialect import insert_for
from api.db.models import AuthFailure
from api.settings import Settings

BUCKETS_PER_WINDOW = 6


def bucket_s(settings: Settings) -> int:
    return max(1, math.ceil(settings.auth_fail_window_s / BUCKETS_PER_WINDOW))


SIGNIN_PREFIX = "signin:"


def signin_source(address: str) -> str:
    """The key sign-in attempts from `address` are counted under (apart from failed attach credentials)."""
    return f"{SIGNIN_PREFIX}{limit_key(address)}"[:64]


async def record(sessions: async_sessionmaker[AsyncSession], source: str, settings: Settings,
                 now: float | None = None, *, limit: int | None = None) -> schemas.AuthFailureReply:
    """Count one failure from `source`; the failures inside the window and how long the source must wait.
    ``limit`` replaces ``auth_fail_limit`` (the sign-in routes' own limit)."""
    source = limit_key(source)  # a gateway reports the address it saw: an IPv6 one counts as its /64
    t = time.time() if now is None else now
    current = int(t // bucket_s(settings))
    async with sessions() as db:
        insert = insert_for(db)(AuthFailure).values(source=source, bucket=current, count=1)
        await db.execute(insert.on_conflict_do_update(index_elements=["source", "bucket"],
                                                      set_={"count": AuthFailure.count + 1}))
        buckets = await _window(db, source, settings, t)
        await db.commit()
    return _reply(buckets, settings, t, settings.auth_fail_limit if limit is None else limit)


async def check(sessions: async_sessionmaker[AsyncSession], source: str, settings: Settings,
                now: float | None = None, *, limit: int | None = None) -> schemas.AuthFailureReply:
    """What `record` would say without counting anything: is `source` at its limit, and for how long."""
    source = limit_key(source)
    t = time.time() if now is None else now
    async with sessions() as db:
        buckets = await _window(db, source, settings, t)
    return _reply(buckets, settings, t, settings.auth_fail_limit if limit is None else limit)


async def _window(db: AsyncSession, source: str, settings: Settings, t: float) -> list[tuple[int, int]]:
    first = int(t // bucket_s(settings)) - BUCKETS_PER_WINDOW + 1
    rows = (await db.execute(
        select(AuthFailure.bucket, AuthFailure.count)
        .where(AuthFailure.source == source, AuthFailure.bucket >= first)
        .order_by(AuthFailure.bucket))).all()
    return [(int(bucket), int(count)) for bucket, count in rows]


def _reply(buckets: list[tuple[int, int]], settings: Settings, t: float, limit: int) -> schemas.AuthFailureReply:
    failures = sum(count for _, count in buckets)
    retry_after = 0
    if failures >= limit:
        # Until enough of the oldest buckets leave the window to bring the count under the limit.
        remaining = failures
        for bucket, count in buckets:
            remaining -= count
            if remaining < limit:
                retry_after = max(1, math.ceil((bucket + BUCKETS_PER_WINDOW) * bucket_s(settings) - t))
                break
    return schemas.AuthFailureReply(failures=failures, limit=limit, retry_after_s=retry_after)


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
