"""How many events a session's runner may add to the shared database: at most ``per_minute`` in any minute.

Program exits and agent-state changes arrive in heartbeats, and each one was an ``events`` row (an agent
change also a webhook delivery per hook). A runner is the session's own code: unchecked, one session
wrote 5,000 rows (6 MB) in 9 s, without end, into the database every tenant shares.

The count is the database's: the session's runner events of the last minute, which every API replica
sees, so N replicas do not let a runner write N times its budget. The caller has written the session's
row first in the same transaction (the heartbeat's UPDATE), which makes heartbeats of one session take
turns (a row lock on PostgreSQL, the write lock on SQLite): two at once on two replicas do not both count
the same room.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from api.db.models import Event

# A stop's (or delete's) push of the workspace's work to orz/<id> failed: the runner's final report said so.
WORK_NOT_PUSHED_KIND = "work_not_pushed"
# The events a runner adds on its own say-so (actor "runner"): agent-state changes, program exits, and
# a failed push of its work.
RUNNER_EVENT_KINDS = ("agent", "program_exited", "program_restarted", WORK_NOT_PUSHED_KIND)
# The note that some were left out: one per dry spell.
DROPPED_KIND = "events_dropped"
WINDOW = timedelta(minutes=1)


@dataclass
class EventBudget:
    """One heartbeat's view of its session's budget: ``take()`` for each event it would add."""

    left: int | None  # None: no limit
    dry: bool  # the note for the current dry spell is written already

    @classmethod
    async def load(cls, db: AsyncSession, instance_id: str, per_minute: int, now: datetime) -> EventBudget:
        if per_minute <= 0:
            return cls(left=None, dry=False)  # 0 turns the limit off
        since = now - WINDOW
        mine = (Event.instance_id == instance_id, Event.kind.in_(RUNNER_EVENT_KINDS), Event.at > since,
                Event.actor == "runner")
        recent = await db.scalar(select(func.count()).select_from(
            select(Event.id).where(*mine).limit(per_minute).subquery())) or 0
        if recent < per_minute:
            # Room left: whether this spell's note is written matters only once the room is gone, and a
            # first refusal then writes it. Every query here stays inside the last minute (the
            # (instance_id, kind, at) index): a runner decides how often it is asked.
            return cls(left=per_minute - recent, dry=False)
        # No room: the last event kept is in the window (the minute holds per_minute of them), so a note
        # at or after it is too.
        last_kept = await db.scalar(select(func.max(Event.at)).where(*mine))
        last_note = await db.scalar(select(func.max(Event.at)).where(
            Event.instance_id == instance_id, Event.kind == DROPPED_KIND, Event.at > since))
        # A note at or after the last event kept: this spell has said so already.
        dry = last_note is not None and (last_kept is None or last_note >= last_kept)
        return cls(left=per_minute - recent, dry=dry)

    def take(self) -> bool | None:
        """True: add the event. False: leave it out, and add the spell's note (this is its first refusal).
        None: leave it out, the note is there."""
        if self.left is None:
            return True
        if self.left > 0:
            self.left -= 1
            self.dry = False
            return True
        if self.dry:
            return None
        self.dry = True
        return False
