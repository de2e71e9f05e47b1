"""Hourly purge of data that has outlived its use: spent attach-JWT ids past their expiry, and the
gateways' failed-authentication counts once they left their window."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import failed_auth
from api.db.models import UsedJti
from api.settings import Settings

log = logging.getLogger(__name__)

# Verifiers may accept a token a little past `exp` (clock leeway); keep its id until that is over too.
JTI_GRACE = timedelta(minutes=10)


@dataclass
class PurgeReport:
    jtis: int = 0
    auth_failure_buckets: int = 0


class Purger:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Callable[[], datetime],
                 settings: Settings | None = None) -> None:
        self.sessions = sessions
        self.now = clock
        self.settings = settings

    async def run_once(self, keep_going: Callable[[], bool] = lambda: True) -> PurgeReport:
        # An expired attach token is refused on its expiry alone, so its spent id need not be kept.
        async with self.sessions() as db:
            result = await db.execute(delete(UsedJti).where(UsedJti.expires_at < self.now() - JTI_GRACE))
            buckets = await failed_auth.purge(db, self.settings, self.now().timestamp()) if self.settings else 0
            await db.commit()
        report = PurgeReport(jtis=int(result.rowcount or 0), auth_failure_buckets=buckets)  # type: ignore[attr-defined]
        if report.jtis:
            log.info("purge: removed %d spent attach-token ids", report.jtis)
        return report
