"""The idle reaper: stops idle sessions, watches heartbeats, deletes stopped workspaces after retention.

Activity is an attached client, input, or output in the tmux pane (the runner reports all three in its
heartbeats, so an agent working unattended counts as active), and a user arriving: the gateway's authorize
of a connection or channel restarts the idle clock (api/instances/gateway_side.py), which the heartbeat
reporting the attached client could only do seconds later. A session is idle when none of them
happened for longer than its effective idle timeout; idle sessions are *stopped* (compute released,
workspace kept), never deleted. Every change goes through InstanceService, which writes the event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from api import metrics
from api.db.models import Instance, Org
from api.errors import OrzError
from api.instances.limits import effective_idle_timeout_s, effective_retention_s
from api.instances.service import InstanceService
from api.instances.states import State
from api.settings import Settings

log = logging.getLogger(__name__)

ACTOR = "scheduler"
# A running session missing this many heartbeats in a row is marked unhealthy.
MISSED_HEARTBEATS = 3
REAPED_STATES = (State.RUNNING, State.UNHEALTHY, State.STOPPED, State.FAILED)


def last_active_at(inst: Instance) -> datetime:
    """Newest sign of life: activity, or the last start (a just-started or just-woken session is not idle).

    Heartbeats resuming after `unhealthy` are no sign of life (they report what happened meanwhile): on a
    busy host a session whose heartbeats came late again and again would otherwise never be idle."""
    seen = [t for t in (inst.last_activity_at, inst.started_at) if t is not None]
    return max(seen) if seen else inst.state_changed_at


def last_heartbeat_ref(inst: Instance) -> datetime:
    """When the runner was last known to be alive (a session that just became running counts as alive)."""
    seen = [t for t in (inst.last_heartbeat_at, inst.started_at) if t is not None]
    return max(seen) if seen else inst.state_changed_at


@dataclass
class ReapReport:
    stopped: list[str] = field(default_factory=list)
    unhealthy: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class IdleReaper:
    """One pass over every session that can be idle, silent or past retention."""

    def __init__(self, service: InstanceService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    async def run_once(self, keep_going: Callable[[], bool] = lambda: True) -> ReapReport:
        """Reap what is due now; stops early when ``keep_going`` says this replica lost the lease."""
        report = ReapReport()
        async with self.service.db_sessions() as db:
            rows = (await db.execute(
                select(Instance, Org)
                .outerjoin(Org, Org.id == Instance.org_id)
                .where(Instance.state.in_([s.value for s in REAPED_STATES]))
                .order_by(Instance.id)
            )).all()
        for inst, org in rows:
            if not keep_going():
                log.warning("reaper: lease lost, stopping the pass early")
                break
            try:
                await self._reap_one(inst, org, report)
            except OrzError as exc:
                # One session that cannot be handled (state moved on, provider down) must not stall the rest.
                log.warning("reaper: session %s skipped: %s", inst.id, exc.detail)
                report.errors.append(inst.id)
        return report

    async def _reap_one(self, inst: Instance, org: Org | None, report: ReapReport) -> None:
        now = self.service.now()
        state = State(inst.state)
        if state == State.RUNNING:
            silent = now - last_heartbeat_ref(inst)
            if silent > timedelta(seconds=MISSED_HEARTBEATS * self.settings.heartbeat_interval_s):
                reason = f"no heartbeat for {int(silent.total_seconds())} s"
                await self.service.mark_unhealthy(inst, ACTOR, reason)
                self._count(report.unhealthy, inst, "unhealthy", reason)
                return
            timeout = effective_idle_timeout_s(self.settings, org, (inst.spec or {}).get("idle_timeout_s"))
            idle_since = now - timedelta(seconds=timeout)
            if inst.attached_clients == 0 and last_active_at(inst) <= idle_since:
                detail = f"idle: no client, input or output for {timeout} s"
                stopped = await self.service.stop_if_idle(inst, idle_since, ACTOR, "idle", detail)
                if stopped is not None:
                    self._count(report.stopped, inst, "idle_stop", detail)
        elif state == State.UNHEALTHY:
            silent = now - last_heartbeat_ref(inst)
            if silent > timedelta(seconds=self.settings.heartbeat_fail_s):
                reason = f"no heartbeat for {int(silent.total_seconds())} s; compute released"
                await self.service.fail_instance(inst, ACTOR, reason)
                self._count(report.failed, inst, "heartbeat_fail", reason)
        else:
            # Stopped and failed sessions keep their workspace; retention bounds how long.
            kept_since = (inst.stopped_at if state == State.STOPPED else None) or inst.state_changed_at
            retention = effective_retention_s(self.settings, org)
            if now - kept_since > timedelta(seconds=retention):
                reason = f"retention: {state.value} for longer than {retention} s"
                await self.service.delete_expired(inst, ACTOR, reason)
                self._count(report.deleted, inst, "retention_delete", reason)

    @staticmethod
    def _count(bucket: list[str], inst: Instance, action: str, why: str) -> None:
        bucket.append(inst.id)
        metrics.SESSION_REAPS.labels(action=action).inc()
        log.info("reaper: %s session %s (%s)", action, inst.id, why)
