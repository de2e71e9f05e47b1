"""InstanceService, scheduler side (api/instances/service.py puts the sides together)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, or_, update

from api.db.models import Instance, Org
from api.errors import (
    ComputeUnavailable,
)
from api.instances import recordings
from api.instances.providers.base import ProviderFailure
from api.instances.service_base import ServiceBase
from api.instances.states import (
    State,
)


class SchedulerSide(ServiceBase):
    """Called by api/jobs (the idle reaper and the reconciler); every change writes an event."""

    async def stop_if_idle(self, inst: Instance, idle_since: datetime, actor: str, reason: str,
                           detail: str | None = None) -> Instance | None:
        """Stop a session unless it showed activity after ``idle_since``; None when it did."""
        async with self.db_sessions() as db:
            # The guard UPDATE takes the row's write lock first, so a heartbeat that reports activity
            # either lands before it (and the guard fails) or waits until the session is stopping.
            guard = await db.execute(
                update(Instance)
                .where(
                    Instance.id == inst.id,
                    Instance.state == inst.state,
                    Instance.attached_clients == 0,
                    or_(Instance.last_activity_at.is_(None), Instance.last_activity_at <= idle_since),
                    # started_at changes with every start, so a session stopped and started again since
                    # the reaper read it fails here (a return from unhealthy does not: see last_active_at).
                    or_(Instance.started_at <= idle_since,
                        and_(Instance.started_at.is_(None), Instance.state_changed_at <= idle_since)),
                )
                .values(updated_at=self.now())
            )
            if guard.rowcount != 1:  # type: ignore[attr-defined]
                await db.rollback()
                return None
            inst = await self._transition(db, inst, State.STOPPING, actor, "stopping", detail or reason)
        return await self.complete_stop(inst, actor, reason)

    async def complete_stop(self, inst: Instance, actor: str, reason: str) -> Instance:
        """Finish a stop: release compute of a ``stopping`` session and mark it stopped (retries too)."""
        try:
            provider_state = await self.provider.stop(inst.id, inst.provider_state or {})
        except ProviderFailure as exc:
            return await self._fail(inst, actor, f"could not stop: {exc.reason}")
        async with self.db_sessions() as db:
            return await self._transition(
                db, inst, State.STOPPED, actor, "stopped", reason,
                provider_state=provider_state, stopped_at=self.now(), attached_clients=0,
                route_host=None, route_port=None, runner_host_key=None, reason=reason,
                **self._retire_runner_token(inst),
            )

    async def complete_delete(self, inst: Instance, actor: str) -> Instance:
        """Finish a delete of a ``deleting`` session (a retry after a crash or a lost request)."""
        try:
            await self.provider.delete(inst.id, inst.provider_state or {})
        except ProviderFailure as exc:
            return await self._fail(inst, actor, f"could not delete: {exc.reason}")
        async with self.db_sessions() as db:
            await recordings.delete_all(db, inst.id)  # committed with the transition, or not at all
            return await self._transition(
                db, inst, State.DELETED, actor, "deleted", None, deleted_at=self.now(),
                attached_clients=0, route_host=None, route_port=None, runner_host_key=None,
                runner_token_prefix=None, runner_token_hash=None,
                recording_grace_token_hash=None, recording_grace_until=None,  # the recording is gone too
            )

    async def delete_expired(self, inst: Instance, actor: str, reason: str) -> Instance:
        """Delete a stopped or failed session whose retention ran out; the event says why."""
        return await self.delete_instance(inst, actor, reason)

    async def mark_unhealthy(self, inst: Instance, actor: str, reason: str) -> Instance:
        """A running session stopped reporting; heartbeats that resume bring it back to running."""
        async with self.db_sessions() as db:
            return await self._transition(db, inst, State.UNHEALTHY, actor, "unhealthy", reason, reason=reason)

    async def restart_instance(self, inst: Instance, actor: str, reason: str) -> Instance:
        """Fail a session (releasing what is left of its compute) and start it again on its workspace."""
        failed = await self._fail(inst, actor, reason)
        if failed.state != State.FAILED.value:
            return failed
        async with self.db_sessions() as db:
            org = await db.get(Org, failed.org_id)
        return await self._start_row(failed, org.plan if org else "free", actor, kind="retrying")

    async def release_compute(self, session_id: str, actor: str, reason: str, *, delete: bool) -> bool:
        """Stop (or delete) compute the database says should not run; False when the row moved on."""
        async with self.db_sessions() as db:
            row = await db.get(Instance, session_id)
        if row is not None and State(row.state) not in (State.STOPPED, State.FAILED, State.DELETED):
            return False  # started again meanwhile: that compute is wanted now
        provider_state = (row.provider_state or {}) if row is not None else {}
        if self.fence is not None:
            async with self.db_sessions() as db:
                await self.fence(db)  # a deposed leader leaves the compute to the new one
        try:
            if delete:
                await self.provider.delete(session_id, provider_state)
            else:
                await self.provider.stop(session_id, provider_state)
        except ProviderFailure as exc:
            raise ComputeUnavailable(f"could not release compute of {session_id}: {exc.reason}") from exc
        if row is not None:
            async with self.db_sessions() as db:
                if self.fence is not None:
                    await self.fence(db)
                db.add(self._event(row, actor, "compute_deleted" if delete else "compute_stopped",
                                   None, None, reason))
                await db.commit()
        return True
