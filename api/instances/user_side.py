"""InstanceService, user side (api/instances/service.py puts the sides together)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError

from api import schemas
from api.auth import Principal
from api.db import tokens
from api.db.models import Event, Instance, Org
from api.errors import (
    ComputeUnavailable,
    Conflict,
    InvalidTransition,
    NotFound,
    QuotaExceeded,
    UnsavedWork,
    WorkUnknown,
)
from api.instances import recordings, repo_policy
from api.instances.ids import new_session_id
from api.instances.limits import effective_idle_timeout_s, effective_retention_s
from api.instances.providers.base import ProviderFailure
from api.instances.service_base import ServiceBase
from api.instances.states import (
    ACTIVE_STATES,
    State,
    check_transition,
)

# The name the module had before it was split: log filters and dashboards use it.
log = logging.getLogger("api.instances.service")

ID_ATTEMPTS = 5
_INSTANCE_BY_ID = select(Instance.__table__).where(Instance.__table__.c.id == bindparam("id"))
_STOPPED_OR_STOPPING = frozenset({State.STOPPED.value, State.STOPPING.value})
# Where the program may have written since the runner's last scan: a delete without force waits for the
# runner's final report (pending: no runner has started yet).
_PROGRAM_MAY_RUN = frozenset({State.STARTING, State.RUNNING, State.UNHEALTHY, State.STOPPING})
_FINAL_WORK_POLL_S = 0.2
_STOPPED_TO_CHECK = "stopped to check the workspace for unsaved work before a delete"


class UserSide(ServiceBase):
    """What users ask for through the API: queries and the lifecycle (create, start, stop, delete)."""

    async def get(self, who: Principal, session_id: str) -> Instance:
        """A detached snapshot of one session, for reading only.

        The API's hottest read goes through Core rather than the ORM unit of work: the ORM's per-object
        bookkeeping measured ~40% of the cost of this one-row lookup."""
        found = None
        if schemas.SESSION_ID_RE.match(session_id):
            async with self.autocommit() as db:
                row = (await db.execute(_INSTANCE_BY_ID, {"id": session_id})).first()
            found = Instance(**row._mapping) if row is not None else None
        return self._visible_to(who, session_id, found)

    async def list(self, who: Principal) -> list[Instance]:
        """A member's own sessions; an admin's whole org."""
        query = select(Instance).where(Instance.org_id == who.org_id, Instance.state != State.DELETED.value)
        if not who.is_admin:
            query = query.where(Instance.user_id == who.user_id)
        async with self.autocommit() as db:
            rows = await db.scalars(query.order_by(Instance.created_at.desc(), Instance.id))
            return list(rows)

    async def events(self, who: Principal, session_id: str, limit: int = 20) -> list[Event]:
        async with self.autocommit() as db:
            await self._owned(db, who, session_id)
            rows = await db.scalars(
                select(Event)
                .where(Event.instance_id == session_id, Event.org_id == who.org_id)
                .order_by(Event.id.desc())
                .limit(limit)
            )
            return list(reversed(list(rows)))

    async def program_exit(self, who: Principal, inst: Instance) -> schemas.ProgramExit | None:
        """A running session's program exit, when its latest program event since it last started is an exit
        (not a restart)."""
        if inst.state != State.RUNNING.value:
            return None
        async with self.autocommit() as db:
            last = await db.scalar(
                select(Event)
                .where(Event.instance_id == inst.id, Event.org_id == inst.org_id,
                       or_(Event.kind.in_(schemas.PROGRAM_EVENT_KINDS), Event.to_state == State.STARTING.value))
                .order_by(Event.id.desc())
                .limit(1)
            )
        if last is None or last.kind != "program_exited":
            return None
        return schemas.ProgramExit(at=last.at, message=last.message or "the program exited")

    async def org_limits(self, org_id: str) -> tuple[int, int]:
        """The idle timeout and the retention that apply to the org's sessions, in seconds."""
        async with self.autocommit() as db:
            org = await db.get(Org, org_id)
        return effective_idle_timeout_s(self.settings, org, None), effective_retention_s(self.settings, org)

    async def quota(self, org_id: str, plan: str) -> schemas.Quota:
        async with self.autocommit() as db:
            active = await self._count_active(db, org_id)
        return schemas.Quota(limit=self.settings.quota_for(plan), active=active, plan=plan)

    async def read_log(self, who: Principal, session_id: str) -> str:
        inst = await self.get(who, session_id)
        return await self.provider.read_log(inst.id, inst.provider_state or {})

    async def read_recording(self, who: Principal, session_id: str, *, previous: bool = False) -> bytes:
        """The session's pane recording (asciicast v2), for whoever may see the session; NotFound says why not."""
        inst = await self.get(who, session_id)
        if not await self._recording_on(inst.org_id):
            raise NotFound(f"session {inst.id} has no recording: recording is turned off for your org "
                           "(an operator turns it on with `orz admin set-recording ORG on`)")
        async with self.autocommit() as db:
            data = await recordings.read(db, inst.id, previous=previous)
        if data is None:
            what = "no earlier part (it has not reached its size cap)" if previous else "no recording yet"
            raise NotFound(f"session {inst.id} has {what}")
        return data

    async def create(self, who: Principal, req: schemas.InstanceCreate) -> Instance:
        idle = self._bounded_idle_timeout(who, req.idle_timeout_s)
        if req.repo_url:
            # Before anything exists: a refused URL leaves no row, no event, no compute.
            await repo_policy.check_repo_url(req.repo_url, self.settings, self.resolve_host)
        await self._require_isolation()
        runner_token = tokens.issue(tokens.RUNNER_TOKEN_PREFIX)
        async with self.db_sessions() as db:
            # Resolve secrets first: a missing name fails the create before anything exists.
            secret_env = await self._secret_env(db, who.org_id, who.user_id, req.secrets)
            await db.rollback()
            for attempt in range(ID_ATTEMPTS):
                # Created and moved to starting in one transaction (both events are written): the
                # provider is asked right after, outside the transaction.
                inst = Instance(
                    id=new_session_id(req.repo_url),
                    org_id=who.org_id,
                    user_id=who.user_id,
                    state=check_transition(State.PENDING, State.STARTING).value,
                    tier=req.tier,
                    program=req.program,
                    repo_url=req.repo_url,
                    branch=req.branch,
                    task=req.task,
                    spec={"secrets": list(req.secrets), "idle_timeout_s": idle,
                          "max_services": self.settings.services_for(who.plan)},
                    provider=self.provider.name,
                    provider_state={},
                    runner_token_prefix=runner_token.prefix,
                    runner_token_hash=runner_token.digest,
                    created_at=self.now(),
                    updated_at=self.now(),
                    state_changed_at=self.now(),
                )
                try:
                    await self._lock_org_and_check_quota(db, who.org_id, who.plan)
                    db.add(inst)
                    db.add(self._event(inst, who.actor, "created", None, State.PENDING,
                                       f"tier {req.tier}" + (f", repo {req.repo_url}" if req.repo_url else "")))
                    db.add(self._event(inst, who.actor, "starting", State.PENDING, State.STARTING, None))
                    await db.commit()
                    break
                except IntegrityError:
                    # A session id collision (6 random characters): try another id.
                    await db.rollback()
                    if attempt == ID_ATTEMPTS - 1:
                        raise
        await self._notify(inst, State.PENDING, State.STARTING)
        return await self._launch(inst, who.actor, runner_token.value, secret_env, fresh=True)

    async def start(self, who: Principal, session_id: str, *, actor: str | None = None,
                    pull: bool = False) -> Instance:
        async with self.db_sessions() as db:
            inst = await self._owned(db, who, session_id)
        if pull and State(inst.state) in ACTIVE_STATES:
            raise Conflict(f"session {inst.id} is {inst.state}: --pull applies when it starts; run git pull in "
                           f"it, or stop it and start it again with --pull",
                           current_state=inst.state)
        return await self._start_row(inst, who.plan, actor or who.actor, pull=pull)

    async def stop(self, who: Principal, session_id: str) -> Instance:
        async with self.db_sessions() as db:
            inst = await self._owned(db, who, session_id)
        return await self.stop_instance(inst, who.actor, reason="stopped by user")

    async def delete(self, who: Principal, session_id: str, *, force: bool = False) -> Instance:
        """A user's delete; refused while the workspace holds work no branch holds, unless forced.

        Two phases for a session whose program may still be writing: the last periodic scan can miss what
        it wrote a moment ago, so the session is stopped first (its runner pushes the work to orz/<id>
        where it can, and reports the workspace's final state), and the delete goes on only if that final
        state holds nothing unsaved. Refused, the session stays stopped with its workspace kept."""
        async with self.db_sessions() as db:
            inst = await self._owned(db, who, session_id)
        if not force:
            # What the last report already shows is refused at once, with the session left as it is.
            refuse_unsaved_work(inst)
            if self._program_may_have_run(inst):
                inst = await self._final_work(inst, who.actor)
                refuse_unsaved_work(inst, stopped=True)
        return await self.delete_instance(inst, who.actor)

    def _program_may_have_run(self, inst: Instance) -> bool:
        """Whether the session's program (or setup.init) may have written since the runner's last report.

        A starting session without a route has no endpoint up yet, so neither init nor the program started
        in this run: the last report (the previous run's final one) still holds."""
        if not self.provider.reports_final_work or State(inst.state) not in _PROGRAM_MAY_RUN:
            return False
        return inst.state != State.STARTING.value or bool(inst.route_host)

    async def _final_work(self, inst: Instance, actor: str) -> Instance:
        """Stop the session (unless it is stopping already) and wait, bounded, for its runner's final work
        report; the row then, or WorkUnknown (the session left stopped) when no such report came."""
        ours = inst.state != State.STOPPING.value  # else another stop is under way: it ends it, we wait
        if ours:
            async with self.db_sessions() as db:
                # The stored report is from before this stop: only a report the stopping runner sends is final.
                inst = await self._transition(
                    db, inst, State.STOPPING, actor, "stopping",
                    _STOPPED_TO_CHECK,
                    work={**inst.work, "final": False} if inst.work else None)
            try:
                provider_state = await self.provider.stop(inst.id, inst.provider_state or {})
            except ProviderFailure as exc:
                await self._fail(inst, actor, f"could not stop: {exc.reason}")
                raise WorkUnknown(f"session {inst.id} could not be stopped to read its workspace's final state "
                                  f"({exc.reason}); delete anyway with ?force=true") from None
            async with self.db_sessions() as db:
                await db.execute(update(Instance).where(Instance.id == inst.id, Instance.state == State.STOPPING.value)
                                 .values(provider_state=provider_state))
                await db.commit()
        row = await self._wait_final_work(inst.id, self.settings.delete_work_wait_s)
        if ours and row.state == State.STOPPING.value:
            # Settled as a stop: the workspace is kept whatever is decided next.
            async with self.db_sessions() as db:
                with contextlib.suppress(InvalidTransition):  # another request moved it on: that stands
                    row = await self._transition(
                        db, row, State.STOPPED, actor, "stopped", _STOPPED_TO_CHECK,
                        stopped_at=self.now(), attached_clients=0, route_host=None, route_port=None,
                        runner_host_key=None, reason=_STOPPED_TO_CHECK, **self._retire_runner_token(row))
        if not (row.work or {}).get("final"):
            raise WorkUnknown(
                f"session {row.id} did not report its workspace's final state within "
                f"{self.settings.delete_work_wait_s:g} s of being stopped, so it may hold unsaved work; it is "
                f"{row.state} with its workspace kept: start it and check, or delete anyway with ?force=true",
                current_state=row.state)
        return row

    async def _wait_final_work(self, session_id: str, timeout_s: float) -> Instance:
        """The row once its work report is final or it left ``stopping`` (failed, say), else at the deadline.

        Polls the database: the runner's report may reach any replica of the API."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            async with self.autocommit() as db:
                row = await db.get(Instance, session_id, populate_existing=True)
            assert row is not None  # rows are never removed, only marked deleted
            if (row.work or {}).get("final") or row.state != State.STOPPING.value or loop.time() >= deadline:
                return row
            await asyncio.sleep(_FINAL_WORK_POLL_S)

    async def stop_instance(self, inst: Instance, actor: str, reason: str) -> Instance:
        """Release compute and keep the workspace (users, the idle reaper).

        A session already stopping (the reaper got there first, or another stop) is what was asked for:
        the caller gets it as it is, not a conflict."""
        if inst.state in _STOPPED_OR_STOPPING:
            return inst
        async with self.db_sessions() as db:
            try:
                inst = await self._transition(db, inst, State.STOPPING, actor, "stopping", reason)
            except InvalidTransition as exc:
                if exc.extra.get("current_state") not in _STOPPED_OR_STOPPING:
                    raise
                fresh = await db.get(Instance, inst.id, populate_existing=True)
                assert fresh is not None  # rows are never removed, only marked deleted
                return fresh
        return await self.complete_stop(inst, actor, reason)

    async def delete_instance(self, inst: Instance, actor: str, reason: str | None = None) -> Instance:
        """Remove compute and workspace; the row stays as `deleted` for the audit trail."""
        async with self.db_sessions() as db:
            inst = await self._transition(db, inst, State.DELETING, actor, "deleting", reason)
        return await self.complete_delete(inst, actor)

    async def fail_instance(self, inst: Instance, actor: str, reason: str) -> Instance:
        """Mark a session failed and release its compute (heartbeats lost, fatal runner error)."""
        return await self._fail(inst, actor, reason)

    async def suspend_for_shutdown(self, reason: str) -> list[str]:
        """Stop every active session (the embedded server is going down); returns their ids."""
        async with self.db_sessions() as db:
            rows = list(await db.scalars(select(Instance).where(
                Instance.state.in_([State.STARTING.value, State.RUNNING.value, State.UNHEALTHY.value]))))
        stopped = []
        for row in rows:
            try:
                await self.stop_instance(row, "system", reason)
                stopped.append(row.id)
            except InvalidTransition:
                continue
        return stopped

    async def resume_after_shutdown(self, reason: str) -> list[str]:
        """Start again the sessions that suspend_for_shutdown stopped."""
        async with self.db_sessions() as db:
            rows = list(await db.scalars(select(Instance).where(
                Instance.state == State.STOPPED.value, Instance.reason == reason)))
        resumed = []
        for row in rows:
            async with self.db_sessions() as db:
                org = await db.get(Org, row.org_id)
            try:
                await self._start_row(row, org.plan if org else "free", "system")
                resumed.append(row.id)
            except (QuotaExceeded, InvalidTransition, ComputeUnavailable) as exc:
                log.warning("session %s not resumed: %s", row.id, exc)
        return resumed


def refuse_unsaved_work(inst: Instance, *, stopped: bool = False) -> None:
    """Raise UnsavedWork when deleting ``inst`` would lose what its runner last reported; ``stopped``:
    the delete stopped the session to read that report.

    A session on its way out already (deleting, deleted) is left to the state machine's own answer."""
    if not inst.work or inst.state in (State.DELETING.value, State.DELETED.value):
        return
    work = schemas.WorkState.model_validate(inst.work)
    if work.at_risk:
        then = ("it was stopped to read this and its workspace is kept: start it and push the work, or delete "
                "anyway with ?force=true" if stopped else
                f"push it, or delete anyway with ?force=true (a running session pushes it to orz/{inst.id} "
                f"first where it can)")
        raise UnsavedWork(f"session {inst.id} has unsaved work: {work.summary()}; {then}",
                          work=work.model_dump(mode="json", exclude_none=True), current_state=inst.state)
