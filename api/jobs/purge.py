"""Hourly purge of data that has outlived its use: spent attach-JWT ids past their expiry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db.models import UsedJti

log = logging.getLogger(__name__)

# Verifiers may accept a token a little past `exp` (clock leeway); keep its id until that is over too.
JTI_GRACE = timedelta(minutes=10)


@dataclass
class PurgeReport:
    jtis: int = 0


class Purger:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: Callable[[], datetime]) -> None:
        self.sessions = sessions
        self.now = clock

    async def run_once(self, keep_going: Callable[[], bool] = lambda: True) -> PurgeReport:
        # An expired attach token is refused on its expiry alone, so its spent id need not be kept.
        async with self.sessions() as db:
            result = await db.execute(delete(UsedJti).where(UsedJti.expires_at < self.now() - JTI_GRACE))
            await db.commit()
        report = PurgeReport(jtis=int(result.rowcount or 0))  # type: ignore[attr-defined]
        if report.jtis:
            log.info("purge: removed %d spent attach-token ids", report.jtis)
        return report
