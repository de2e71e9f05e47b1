"""The reconciler: compares the database with what the provider really runs and repairs both ways.

- A running session whose compute vanished is marked failed with the reason and started again on its
  workspace once (per RETRY_WINDOW); a second loss inside the window leaves it failed.
- A session stuck in ``pending``/``starting`` past ``start_timeout_s`` is retried once, then failed;
  one stuck in ``stopping``/``deleting`` has its stop/delete retried (after STOP_SETTLE when its compute
  is already gone, as when the actor doing it was killed half-way).
- Compute without a live session row is released: a deleted session's compute and workspace are
  deleted; compute of a stopped or failed session, or with no row at all (an orphan), is stopped
  (pods/processes gone, workspace kept). An orphan's workspace is kept on purpose: a missing row can
  mean a restored or mistaken database, and deleting users' files on that guess cannot be undone.

The provider is listed *before* the rows are read: rows are committed before compute is created, so
compute seen in the listing always has its row visible to the later read (no false orphans).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select

from api import metrics
from api.db.models import Event, Instance
from api.errors import OrzError
from api.instances.providers.base import ComputeStatus
from api.instances.service import InstanceService
from api.instances.states import State
from api.settings import Settings

log = logging.getLogger(__name__)

ACTOR = "scheduler"
RETRY_KIND = "retrying"
OUT_OF_MEMORY_KIND = "out_of_memory"
# The reconciler restarts a session at most once in this window; a crash loop ends in `failed`.
RETRY_WINDOW = timedelta(hours=1)
# A provider's stop takes up to ~20 s (the local provider's grace and kill); past this a stopping or
# deleting row whose compute is gone has no actor left to finish it.
STOP_SETTLE = timedelta(seconds=60)
GONE_PHASES = frozenset({"absent", "stopped", "failed"})
LIVE_PHASES = frozenset({"pending", "running"})
# Sessions whose compute should be up: an OOM kill of theirs is news to the user.
LIVE_STATES = (State.STARTING, State.RUNNING, State.UNHEALTHY)
# Ids per lookup of the rows behind listed compute.
ID_CHUNK = 1000
WATCHED_STATES = (State.PENDING, State.STARTING, State.RUNNING, State.UNHEALTHY, State.STOPPING, State.DELETING)
# How much of the provider's word on why compute failed goes into a session's reason (and the log's line).
PROVIDER_WORD_MAX = 300
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def provider_word(message: str) -> str:
    """The provider's message, fit for a reason and a log line: the local provider's is the session's own
    state/fatal_error, which code in the session writes (up to 4 KB, any bytes). One line without control
    characters (an escape sequence would drive the operator's terminal, a newline forge a log line),
    clipped to PROVIDER_WORD_MAX characters as the Kubernetes provider clips a Pod's reason."""
    line = _CONTROLS.sub(" ", message).strip()
    return line if len(line) <= PROVIDER_WORD_MAX else line[:PROVIDER_WORD_MAX - 1] + "\u2026"


@dataclass
class ReconcileReport:
    restarted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    orphans_deleted: list[str] = field(default_factory=list)
    orphans_stopped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, service: InstanceService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    async def run_once(self, keep_going: Callable[[], bool] = lambda: True) -> ReconcileReport:
        report = ReconcileReport()
        listed_at = self.service.now()
        compute = await self.service.provider.list()
        rows = await self._rows(compute)
        for row in rows.values():
            if not keep_going():
                return report
            await self._guarded(report, row.id, self._check_row(row, compute.get(row.id), listed_at, report))
        for session_id, status in compute.items():
            if not keep_going():
                return report
            await self._guarded(report, session_id, self._check_compute(session_id, status, rows.get(session_id),
                                                                        listed_at, report))
        return report

    async def _rows(self, compute: dict[str, ComputeStatus]) -> dict[str, Instance]:
        """Rows the database holds active, plus the rows of any compute seen (looked up in bounded chunks:
        one IN list of 10,000 ids is slow everywhere and past 32,767 PostgreSQL's driver refuses it)."""
        async with self.service.db_sessions() as db:
            rows = {row.id: row for row in await db.scalars(
                select(Instance).where(Instance.state.in_([s.value for s in WATCHED_STATES])))}
            missing = [sid for sid in compute if sid not in rows]
            for start in range(0, len(missing), ID_CHUNK):
                chunk = missing[start:start + ID_CHUNK]
                rows.update((row.id, row) for row in await db.scalars(select(Instance).where(Instance.id.in_(chunk))))
        return rows

    async def _guarded(self, report: ReconcileReport, session_id: str, step: Awaitable[None]) -> None:
        try:
            await step
        except OrzError as exc:
            # Leave this one for the next pass; the rest still gets repaired.
            log.warning("reconcile: session %s skipped: %s", session_id, exc.detail)
            report.errors.append(session_id)

    async def _check_row(self, row: Instance, status: ComputeStatus | None, listed_at: datetime,
                         report: ReconcileReport) -> None:
        """Sessions the database believes are active or mid-transition."""
        state = State(row.state)
        # Rows that changed after the listing are judged on the next pass, against a fresh listing.
        if row.state_changed_at >= listed_at:
            return
        phase = status.phase if status else "absent"
        if status is not None and status.out_of_memory and state in LIVE_STATES:
            await self._record_out_of_memory(row, status.out_of_memory)
        age = listed_at - row.state_changed_at
        stuck = age > timedelta(seconds=self.settings.start_timeout_s)
        # A stop or delete whose compute is already gone, long after any live actor would have finished
        # it: its actor died half-way (a scheduler or API killed mid-stop). Not start_timeout_s later.
        settled = phase in GONE_PHASES and age > STOP_SETTLE
        if state in (State.RUNNING, State.UNHEALTHY) and phase in GONE_PHASES:
            # The provider's word on why (e.g. Kubernetes evicted the Pod for filling its disk) is what the
            # user needs to keep it from happening again.
            said = status.message if status is not None and phase == "failed" else None
            why = f": {provider_word(said)}" if said else ""
            await self._restart_or_fail(row, f"compute vanished (provider reports {phase}{why})", report)
        elif state in (State.PENDING, State.STARTING) and stuck:
            await self._restart_or_fail(
                row, f"did not start within {self.settings.start_timeout_s} s (compute {phase})", report)
        elif state == State.STOPPING and (stuck or settled):
            await self.service.complete_stop(row, ACTOR, row.reason or "stop retried by the reconciler")
            self._note(report.finished, row.id, "stop_retried")
        elif state == State.DELETING and (stuck or settled):
            await self.service.complete_delete(row, ACTOR)
            self._note(report.finished, row.id, "delete_retried")

    async def _check_compute(self, session_id: str, status: ComputeStatus, row: Instance | None,
                             listed_at: datetime, report: ReconcileReport) -> None:
        """Compute the provider holds: is there still a session that wants it?"""
        if row is None:
            if status.phase in LIVE_PHASES and await self.service.release_compute(
                    session_id, ACTOR, "orphan: no session row", delete=False):
                self._note(report.orphans_stopped, session_id, "orphan_stopped")
            return
        state = State(row.state)
        if row.state_changed_at >= listed_at:
            return
        if state == State.DELETED:
            if await self.service.release_compute(session_id, ACTOR, "session was deleted", delete=True):
                self._note(report.orphans_deleted, session_id, "orphan_deleted")
        elif state in (State.STOPPED, State.FAILED) and status.phase in LIVE_PHASES:
            reason = f"compute still {status.phase} for a {state.value} session"
            if await self.service.release_compute(session_id, ACTOR, reason, delete=False):
                self._note(report.orphans_stopped, session_id, "orphan_stopped")

    async def _record_out_of_memory(self, row: Instance, message: str) -> None:
        """An event the user sees (`orz cloud status`): the session's compute was OOM-killed and restarted.
        Once per kill: the message names the kill's time, and an event with that message is not written again."""
        async with self.service.db_sessions() as db:
            seen = await db.scalar(select(func.count()).select_from(Event).where(
                Event.instance_id == row.id, Event.kind == OUT_OF_MEMORY_KIND, Event.message == message))
            if seen:
                return
            db.add(Event(instance_id=row.id, org_id=row.org_id, at=self.service.now(), actor=ACTOR,
                         kind=OUT_OF_MEMORY_KIND, message=message))
            await db.commit()
        metrics.RECONCILE_ACTIONS.labels(action="out_of_memory").inc()
        log.warning("reconcile: session %s: %s", row.id, message)

    async def _restart_or_fail(self, row: Instance, reason: str, report: ReconcileReport) -> None:
        if await self._retries_in_window(row.id) == 0:
            restarted = await self.service.restart_instance(row, ACTOR, reason)
            self._note(report.restarted, row.id, "restarted", f"{reason}; now {restarted.state}")
        else:
            await self.service.fail_instance(row, ACTOR, f"{reason}; already retried, giving up")
            self._note(report.failed, row.id, "failed", reason)

    async def _retries_in_window(self, session_id: str) -> int:
        since = self.service.now() - RETRY_WINDOW
        async with self.service.db_sessions() as db:
            count = await db.scalar(
                select(func.count()).select_from(Event).where(
                    Event.instance_id == session_id, Event.actor == ACTOR, Event.kind == RETRY_KIND,
                    Event.at >= since,
                )
            )
        return int(count or 0)

    @staticmethod
    def _note(bucket: list[str], session_id: str, action: str, why: str = "") -> None:
        bucket.append(session_id)
        metrics.RECONCILE_ACTIONS.labels(action=action).inc()
        log.info("reconcile: %s session %s%s", action, session_id, f" ({why})" if why else "")
