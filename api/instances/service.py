"""Instance lifecycle: the only place that touches the provider and the database together.

Every state change goes through ``_transition``, a conditional UPDATE (``WHERE state = <expected>``)
that also writes the audit event, so two concurrent requests can never both move the same session.
Provider calls happen outside database transactions; a failed provider call leaves the session in
``failed`` with a reason the user can read, and never leaves compute running without a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import bindparam, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import metrics, schemas
from api.auth import Principal
from api.db import tokens
from api.db.base import utcnow
from api.db.models import Event, Instance, Org, UsedJti, User
from api.errors import (
    BadRequest,
    ComputeUnavailable,
    Conflict,
    Forbidden,
    InvalidTransition,
    NotFound,
    OrzError,
    QuotaExceeded,
    SandboxRequired,
    SessionFailed,
    Unauthorized,
)
from api.instances import access, repo_policy
from api.instances.ids import new_session_id
from api.instances.providers.base import ComputeSpec, Provider, ProviderFailure
from api.instances.states import (
    ACTIVE_STATES,
    ATTACHABLE_STATES,
    GONE_STATES,
    STARTABLE_STATES,
    State,
    check_transition,
)
from api.settings import Settings
from api.webhooks import outbox as webhook_outbox

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
ID_ATTEMPTS = 5
# An UPDATE ... RETURNING(Instance) loads the new values even into an object the session already holds.
_REFRESH = {"populate_existing": True, "synchronize_session": False}
_INSTANCE_BY_ID = select(Instance.__table__).where(Instance.__table__.c.id == bindparam("id"))
_NOT_YOURS = "session {id} belongs to someone else in your org; only its owner and org admins may use it"


class SecretEnvSource(Protocol):
    """Resolves the secret names a create request lists into environment values (see api/secrets)."""

    async def env_for(self, db: AsyncSession, org_id: str, user_id: str, names: Sequence[str]) -> dict[str, str]:
        ...


class InstanceService:
    def __init__(
        self,
        settings: Settings,
        db_sessions: async_sessionmaker[AsyncSession],
        provider: Provider,
        *,
        gateway_public_key: str = "",
        secret_env: SecretEnvSource | None = None,
        clock: Clock = utcnow,
        autocommit_sessions: async_sessionmaker[AsyncSession] | None = None,
        resolve_host: repo_policy.Resolver = repo_policy.system_resolver,
    ) -> None:
        self.settings = settings
        # DNS for the repo_url rule (tests pass a fixed table instead of the network).
        self.resolve_host = resolve_host
        # Database sessions (a sessionmaker), not the users' sessions this service manages.
        self.db_sessions = db_sessions
        # Work that is one statement (lookups, a single-row UPDATE) needs no BEGIN/COMMIT round trips:
        # on this machine each round trip costs ~100 us of the API's CPU.
        self.autocommit = autocommit_sessions or db_sessions
        self.provider = provider
        self.gateway_public_key = gateway_public_key
        self.secret_env = secret_env
        self.now = clock
        self._background: set[asyncio.Task[None]] = set()
        # Listeners notified after every committed transition (metrics, tests).
        self.on_transition: list[Callable[[Instance, State, State], Awaitable[None] | None]] = []
        # The scheduler's leader check, run in each write's transaction before it writes (api/jobs/lease.py).
        self.fence: Callable[[AsyncSession], Awaitable[None]] | None = None

    # ------------------------------------------------------------------------------------ queries

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
        if not self.provider.serves_recordings:
            raise NotFound(f"session {inst.id} has no recording here: the {self.provider.name} provider does "
                           "not serve recordings")
        data = await self.provider.read_recording(inst.id, inst.provider_state or {}, previous=previous)
        if data is None:
            what = "no earlier part (it has not reached its size cap)" if previous else "no recording yet"
            raise NotFound(f"session {inst.id} has {what}")
        return data

    async def _recording_on(self, org_id: str) -> bool:
        async with self.autocommit() as db:
            return bool(await db.scalar(select(Org.recording_enabled).where(Org.id == org_id)))

    # ---------------------------------------------------------------------------------- lifecycle

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

    async def delete(self, who: Principal, session_id: str) -> Instance:
        async with self.db_sessions() as db:
            inst = await self._owned(db, who, session_id)
        return await self.delete_instance(inst, who.actor)

    async def stop_instance(self, inst: Instance, actor: str, reason: str) -> Instance:
        """Release compute and keep the workspace (users, the idle reaper)."""
        if inst.state == State.STOPPED.value:
            return inst
        async with self.db_sessions() as db:
            inst = await self._transition(db, inst, State.STOPPING, actor, "stopping", reason)
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

    # ---------------------------------------------------------------------------- scheduler side
    # Called by api/jobs (the idle reaper and the reconciler); every change writes an event.

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
                    or_(Instance.started_at.is_(None), Instance.started_at <= idle_since),
                    Instance.state_changed_at <= idle_since,
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
                route_host=None, route_port=None, runner_host_key=None,
                runner_token_prefix=None, runner_token_hash=None, reason=reason,
            )

    async def complete_delete(self, inst: Instance, actor: str) -> Instance:
        """Finish a delete of a ``deleting`` session (a retry after a crash or a lost request)."""
        try:
            await self.provider.delete(inst.id, inst.provider_state or {})
        except ProviderFailure as exc:
            return await self._fail(inst, actor, f"could not delete: {exc.reason}")
        async with self.db_sessions() as db:
            return await self._transition(
                db, inst, State.DELETED, actor, "deleted", None, deleted_at=self.now(),
                attached_clients=0, route_host=None, route_port=None, runner_host_key=None,
                runner_token_prefix=None, runner_token_hash=None,
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

    # ----------------------------------------------------------------------------- runner side

    async def record_heartbeat(self, session_id: str, runner_token: str, hb: schemas.Heartbeat
                               ) -> schemas.HeartbeatReply:
        async with self.db_sessions() as db:
            inst = await db.get(Instance, session_id)
            if (
                inst is None
                or not inst.runner_token_hash
                or not tokens.looks_like(runner_token, tokens.RUNNER_TOKEN_PREFIX)
                or not tokens.matches(runner_token, inst.runner_token_hash)
            ):
                raise Unauthorized("invalid runner token")
            now = self.now()
            values: dict[str, Any] = {
                "last_heartbeat_at": now,
                "attached_clients": hb.attached_clients,
                "init_status": hb.init_status,
            }
            socket = self.provider.runner_socket(session_id)
            if hb.host_key and socket and (hb.ssh_host or "").startswith(schemas.UNIX_ROUTE_PREFIX):
                # The path is the provider's, never the runner's: a session cannot point routes elsewhere.
                values.update(route_host=schemas.UNIX_ROUTE_PREFIX + socket, route_port=0,
                              runner_host_key=hb.host_key)
            elif hb.host_key and hb.ssh_port and not socket:
                values.update(route_host=hb.ssh_host, route_port=hb.ssh_port, runner_host_key=hb.host_key)
            activity = [t for t in (hb.last_input_at, hb.last_output_at) if t is not None]
            if hb.attached_clients > 0:
                activity.append(now)
            latest = max(activity, default=None)
            if latest is not None:
                latest = min(latest, now)  # a runner clock ahead of ours must not postpone reaping
                if inst.last_activity_at is None or latest > inst.last_activity_at:
                    values["last_activity_at"] = latest
            if hb.work is not None:
                values["work"] = hb.work.model_dump(mode="json")
            changed = self._agent_change(inst, hb)
            if changed:
                values.update(agent_state=hb.agent_state, agent_message=hb.agent_message,
                              agent_exit_code=hb.agent_exit_code, agent_state_at=now)
                # from/to hold agent states here (kind "agent"), not session states.
                event = Event(instance_id=inst.id, org_id=inst.org_id, at=now, actor="runner", kind="agent",
                              from_state=inst.agent_state, to_state=hb.agent_state, message=changed)
                db.add(event)
                await webhook_outbox.enqueue(db, inst, event, agent_message=hb.agent_message,
                                             exit_code=hb.agent_exit_code)
            await db.execute(update(Instance).where(Instance.id == inst.id).values(**values))
            for pe in hb.program_events or ():
                db.add(self._event(inst, "runner", pe.kind, None, None, pe.message))
                log.info("session %s: %s", inst.id, pe.message, extra={"event": "program", "session_id": inst.id})
            await db.commit()
            await db.refresh(inst)
        state = State(inst.state)
        if hb.fatal_error:
            if state not in GONE_STATES and state not in (State.FAILED, State.STOPPED):
                # The runner that reports a fatal error waits for this reply and then exits by itself;
                # stopping its compute inline would kill the caller mid-request.
                inst = await self._fail(inst, "runner", hb.fatal_error, release_later=True)
        elif hb.services is not None:
            inst = await self._take_services(inst, hb.services)
        elif state in (State.STARTING, State.UNHEALTHY) and inst.runner_host_key and hb.init_status in (
            "succeeded", "none"
        ):
            async with self.db_sessions() as db:
                try:
                    inst = await self._transition(
                        db, inst, State.RUNNING, "runner", "running",
                        "runner is up" if state == State.STARTING else "heartbeats resumed",
                        started_at=self.now() if state == State.STARTING else inst.started_at, reason=None,
                    )
                except InvalidTransition:
                    await db.rollback()
        return schemas.HeartbeatReply(state=inst.state, heartbeat_interval_s=self.settings.heartbeat_interval_s)

    @staticmethod
    def _agent_change(inst: Instance, hb: schemas.Heartbeat) -> str | None:
        """The event message when the heartbeat changes the agent's state (or its message), else None."""
        if hb.agent_state is None:
            return None
        if (hb.agent_state, hb.agent_message, hb.agent_exit_code) == (
                inst.agent_state, inst.agent_message, inst.agent_exit_code):
            return None
        if hb.agent_state == "exited":
            return f"exited with code {hb.agent_exit_code}" if hb.agent_exit_code is not None else "exited"
        return f"{hb.agent_state}: {hb.agent_message}" if hb.agent_message else hb.agent_state

    async def _take_services(self, inst: Instance, services: Sequence[schemas.SidecarSpec]) -> Instance:
        """A starting runner found other services in .orz/cloud.yaml than its Pod runs: restart with them.

        They are kept in the instance's spec, so later starts (stop/start, wake, retries) have them from
        the first Pod. Once per set: the same set reported again changes nothing, and the new runner
        token silences the replaced Pod's runner. Bad services fail the session; nothing is restarted.
        """
        if not self.provider.runs_services or State(inst.state) != State.STARTING:
            return inst
        wanted = [s.model_dump(mode="json") for s in services]
        if wanted == list((inst.spec or {}).get("services") or []):
            return inst
        try:
            async with self.db_sessions() as db:
                secret_env = await self._secret_env(db, inst.org_id, inst.user_id, (inst.spec or {}).get("secrets", []))
            self.provider.check_services(wanted, secret_env, self._max_services(inst))
        except (OrzError, ProviderFailure) as exc:
            reason = exc.reason if isinstance(exc, ProviderFailure) else exc.detail
            # The caller is the runner of the Pod being released: reply first, then release.
            return await self._fail(inst, "runner", reason, release_later=True)
        token = tokens.issue(tokens.RUNNER_TOKEN_PREFIX)
        async with self.db_sessions() as db:
            # Guarded by state and token: a stop, a delete or a concurrent report of this runner wins.
            done = await db.execute(
                update(Instance)
                .where(Instance.id == inst.id, Instance.state == State.STARTING.value,
                       Instance.runner_token_hash == inst.runner_token_hash)
                .values(spec={**(inst.spec or {}), "services": wanted}, runner_token_prefix=token.prefix,
                        runner_token_hash=token.digest, route_host=None, route_port=None,
                        runner_host_key=None, updated_at=self.now())
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                await db.rollback()
                return inst
            names = ", ".join(s.name for s in services) or "none"
            db.add(self._event(inst, "runner", "sidecars", None, None,
                               f"restarting the pod with the services of {schemas.CLOUD_CONFIG_PATH}: {names}"))
            await db.commit()
            row = await db.get(Instance, inst.id, populate_existing=True)
            assert row is not None
        self._spawn(self._restart_with_services(row, token.value, secret_env))
        return row

    async def _restart_with_services(self, inst: Instance, runner_token: str, secret_env: dict[str, str]) -> None:
        """Replace the compute (workspace kept) with compute that runs the services; still ``starting``."""
        try:
            await self.provider.stop(inst.id, inst.provider_state or {})
        except ProviderFailure as exc:
            await self._fail(inst, "system", f"could not restart with the services of "
                                             f"{schemas.CLOUD_CONFIG_PATH}: {exc.reason}")
            return
        async with self.db_sessions() as db:
            current = await db.get(Instance, inst.id)
        if current is None or (current.state, current.runner_token_hash) != (inst.state, inst.runner_token_hash):
            return  # stopped, deleted or failed meanwhile: that wins, nothing is started
        with contextlib.suppress(ComputeUnavailable):  # raised after _launch failed the session with the reason
            await self._launch(current, "system", runner_token, secret_env, fresh=False)

    # ---------------------------------------------------------------------------- gateway side

    async def authorize(self, req: schemas.AuthorizeRequest) -> schemas.AuthorizeReply:
        """May this user attach now, and where is the runner? Wakes a stopped session if asked."""
        async with self.db_sessions() as db:
            user = await db.get(User, req.user_id)
            inst = await db.get(Instance, req.session_id)
            refused = access.refusal(user, inst, req.session_id)
            if refused is not None:
                raise refused
            assert user is not None and inst is not None
            if req.jti:
                await self._spend_jti(db, req.jti, req.jti_expires_at)
            org = await db.get(Org, user.org_id)
            plan = org.plan if org else "free"
            state = State(inst.state)
            if state == State.FAILED:
                raise SessionFailed(f"session {inst.id} failed: {inst.reason or 'unknown reason'}")
            if state == State.STOPPED and not req.wake:
                raise Conflict(f"session {inst.id} is stopped; start it with `orz cloud start {inst.id}`")
        if state == State.STOPPED:
            inst = await self._wake(inst, plan, user.id)
            state = State(inst.state)
        mode = "ro" if req.readonly else "rw"
        route = None
        if (state in ATTACHABLE_STATES and inst.route_host and inst.route_port is not None
                and inst.runner_host_key):
            route = schemas.Route(host=inst.route_host, port=inst.route_port, host_key=inst.runner_host_key)
        message = None if route else f"session {inst.id} is {state.value}"
        return schemas.AuthorizeReply(
            session_id=inst.id, user_id=user.id, state=state.value, mode=mode, route=route, message=message
        )

    async def _wake(self, inst: Instance, plan: str, user_id: str) -> Instance:
        """Start a stopped session because someone attaches to it (wake on connect), counted by result."""
        try:
            woken = await self._start_row(inst, plan, f"user:{user_id}", kind="woke")
        except QuotaExceeded:
            metrics.SESSION_WAKES.labels(result="quota").inc()
            raise
        except ComputeUnavailable:
            metrics.SESSION_WAKES.labels(result="provider_error").inc()
            raise
        except Exception:
            metrics.SESSION_WAKES.labels(result="error").inc()
            raise
        metrics.SESSION_WAKES.labels(result="started").inc()
        return woken

    async def check_access(self, req: schemas.AccessCheck) -> schemas.AccessCheckReply:
        """Which of a gateway's live attachments must end now (user disabled, session gone, access revoked)."""
        if not req.attachments:
            return schemas.AccessCheckReply(revoked=[])
        async with self.db_sessions() as db:
            return schemas.AccessCheckReply(revoked=await access.revoked(db, req.attachments))

    async def record_attach_grant(self, who: Principal, inst: Instance, *, readonly: bool,
                                  certificate: bool) -> None:
        """Audit: who was handed attach credentials for this session (the gateway reports the attach)."""
        what = ("certificate and token" if certificate else "token") + (", read-only" if readonly else "")
        async with self.db_sessions() as db:
            db.add(self._event(inst, who.actor, "attach_granted", None, None, f"{what} for {who.email}"))
            await db.commit()

    async def record_attach_event(self, ev: schemas.AttachEventIn) -> None:
        async with self.db_sessions() as db:
            inst = await db.get(Instance, ev.session_id)
            if inst is None:
                raise NotFound(f"no such session: {ev.session_id}")
            now = self.now()
            await db.execute(update(Instance).where(Instance.id == inst.id).values(last_activity_at=now))
            detail = f"from {ev.source_address or 'unknown'}"
            if ev.event == "detached":
                detail += f", {ev.duration_s:.0f}s, {ev.bytes_in} bytes in, {ev.bytes_out} bytes out"
            db.add(Event(instance_id=inst.id, org_id=inst.org_id, at=now, actor=f"user:{ev.user_id}",
                         kind=ev.event, from_state=None, to_state=None, message=detail))
            await db.commit()

    # --------------------------------------------------------------------------------- helpers

    async def _owned(self, db: AsyncSession, who: Principal, session_id: str) -> Instance:
        inst = None
        if schemas.SESSION_ID_RE.match(session_id):
            inst = await db.get(Instance, session_id)
        return self._visible_to(who, session_id, inst)

    @staticmethod
    def _visible_to(who: Principal, session_id: str, inst: Instance | None) -> Instance:
        # Another org's session is indistinguishable from one that does not exist. A colleague's is a
        # 403, as attach (API and gateway) has always answered: inside an org session ids are shared
        # knowledge, and "someone else's" tells the user whom to ask instead of "it does not exist".
        if inst is None or inst.org_id != who.org_id or inst.state == State.DELETED.value:
            raise NotFound(f"no such session: {session_id}")
        if inst.user_id != who.user_id and not who.is_admin:
            raise Forbidden(_NOT_YOURS.format(id=inst.id))
        return inst

    async def _count_active(self, db: AsyncSession, org_id: str, exclude: str | None = None) -> int:
        q = select(func.count()).select_from(Instance).where(
            Instance.org_id == org_id, Instance.state.in_([s.value for s in ACTIVE_STATES])
        )
        if exclude:
            q = q.where(Instance.id != exclude)
        return int(await db.scalar(q) or 0)

    async def _lock_org_and_check_quota(self, db: AsyncSession, org_id: str, plan: str,
                                        exclude: str | None = None) -> None:
        # The UPDATE takes the org row's write lock (PostgreSQL) or the database write lock (SQLite)
        # before counting, so concurrent creates for one org are serialized and cannot both pass.
        await db.execute(update(Org).where(Org.id == org_id).values(quota_serial=Org.quota_serial + 1),
                         execution_options={"synchronize_session": False})  # no Org objects are loaded here
        limit = self.settings.quota_for(plan)
        active = await self._count_active(db, org_id, exclude=exclude)
        if active >= limit:
            raise QuotaExceeded(
                f"your {plan} plan allows {limit} active sessions and {active} are active; "
                "stop or kill one first",
                limit=limit, current=active, plan=plan,
            )

    async def _start_row(self, inst: Instance, plan: str, actor: str, kind: str = "starting",
                         *, pull: bool = False) -> Instance:
        state = State(inst.state)
        if state in ACTIVE_STATES:
            return inst
        if state not in STARTABLE_STATES:
            check_transition(state, State.STARTING)
        await self._require_isolation()
        runner_token = tokens.issue(tokens.RUNNER_TOKEN_PREFIX)
        async with self.db_sessions() as db:
            secret_env = await self._secret_env(db, inst.org_id, inst.user_id, inst.spec.get("secrets", []))
        async with self.db_sessions() as db:
            await self._lock_org_and_check_quota(db, inst.org_id, plan, exclude=inst.id)
            inst = await self._transition(
                db, inst, State.STARTING, actor, kind, _start_message(kind, pull),
                runner_token_prefix=runner_token.prefix, runner_token_hash=runner_token.digest,
                route_host=None, route_port=None, runner_host_key=None, reason=None, stopped_at=None,
            )
        return await self._launch(inst, actor, runner_token.value, secret_env, fresh=False, pull=pull)

    async def _require_isolation(self) -> None:
        """Without isolation between sessions (ORZ_SANDBOX=off), only a single-org server may start any."""
        if self.provider.isolates_sessions:
            return
        async with self.autocommit() as db:
            orgs = await db.scalar(select(func.count()).select_from(Org))
        if (orgs or 0) > 1:
            raise SandboxRequired(
                f"this server has {orgs} orgs and runs sessions without the sandbox (ORZ_SANDBOX=off); "
                "an admin must turn the sandbox on before sessions can start")

    async def _launch(self, inst: Instance, actor: str, runner_token: str, secret_env: dict[str, str],
                      *, fresh: bool, pull: bool = False) -> Instance:
        # Where the API cannot serve recordings, nobody could read one: the runner is not asked to record.
        recording = (self.settings.recording_max_bytes
                     if self.provider.serves_recordings and await self._recording_on(inst.org_id) else 0)
        spec = self._compute_spec(inst, runner_token, secret_env, pull=pull, recording_max_bytes=recording)
        try:
            if fresh:
                provider_state = await self.provider.create(spec)
            else:
                provider_state = await self.provider.start(spec, inst.provider_state or {})
        except ProviderFailure as exc:
            failed = await self._fail(inst, actor, exc.reason)
            raise ComputeUnavailable(f"session {inst.id} could not start: {exc.reason}",
                                instance_id=failed.id) from exc
        except ValidationError as exc:
            # A row written before today's rules (a NUL in the task) makes a spec no runner accepts.
            reason = f"the session's stored spec is not valid: {schemas.describe_validation(exc)}"
            failed = await self._fail(inst, actor, reason)
            raise SessionFailed(f"session {inst.id} could not start: {reason}", instance_id=failed.id) from exc
        async with self.autocommit() as db:
            fresh_row = await db.scalar(
                update(Instance).where(Instance.id == inst.id).values(provider_state=provider_state)
                .returning(Instance), execution_options=_REFRESH,
            )
            await db.commit()
            if fresh_row is None:
                raise NotFound(f"no such session: {inst.id}")
            return fresh_row

    async def _fail(self, inst: Instance, actor: str, reason: str, *, release_later: bool = False) -> Instance:
        """Mark the session failed first, then release its compute (now, or in the background)."""
        log.warning("session %s failed: %s", inst.id, reason)
        async with self.db_sessions() as db:
            current = await db.get(Instance, inst.id)
            if current is None or State(current.state) in (State.FAILED, State.DELETED):
                row = current or inst
            else:
                row = await self._transition(
                    db, current, State.FAILED, actor, "failed", reason, reason=reason,
                    attached_clients=0, route_host=None, route_port=None, runner_host_key=None,
                    runner_token_prefix=None, runner_token_hash=None,
                )
        release = self._stop_compute_quietly(row.id, dict(row.provider_state or inst.provider_state or {}))
        if release_later:
            self._spawn(release)
        else:
            await release
        return row

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run work after the reply; wait_background (and shutdown) sees it through."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("background work failed", exc_info=task.exception())

        task.add_done_callback(done)

    async def _stop_compute_quietly(self, session_id: str, provider_state: dict[str, Any]) -> None:
        try:
            await self.provider.stop(session_id, provider_state)
        except ProviderFailure as exc:
            log.warning("session %s: could not release compute after failure: %s", session_id, exc.reason)

    async def wait_background(self) -> None:
        """Let background work (compute released after failures) finish; called on shutdown."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _transition(self, db: AsyncSession, inst: Instance, target: State, actor: str, kind: str,
                          message: str | None, **values: Any) -> Instance:
        current = State(inst.state)
        check_transition(current, target)
        if self.fence is not None:
            await self.fence(db)
        now = self.now()
        # RETURNING hands back the updated row in the same round trip as the conditional UPDATE.
        row = await db.scalar(
            update(Instance)
            .where(Instance.id == inst.id, Instance.state == current.value)
            .values(state=target.value, state_changed_at=now, updated_at=now, **values)
            .returning(Instance), execution_options=_REFRESH,
        )
        if row is None:
            await db.rollback()
            fresh = await db.get(Instance, inst.id, populate_existing=True)
            raise InvalidTransition(
                f"session {inst.id} changed state meanwhile (now {fresh.state if fresh else 'gone'})",
                current_state=fresh.state if fresh else None,
            )
        event = self._event(inst, actor, kind, current, target, message)
        db.add(event)
        await webhook_outbox.enqueue(db, row, event)  # in this transaction: committed with the event or not at all
        await db.commit()
        await self._notify(row, current, target)
        return row

    async def _notify(self, row: Instance, current: State, target: State) -> None:
        for listener in self.on_transition:
            outcome = listener(row, current, target)
            if asyncio.iscoroutine(outcome):
                await outcome

    def _event(self, inst: Instance, actor: str, kind: str, from_state: State | None,
               to_state: State | None, message: str | None) -> Event:
        return Event(
            instance_id=inst.id, org_id=inst.org_id, at=self.now(), actor=actor, kind=kind,
            from_state=from_state.value if from_state else None,
            to_state=to_state.value if to_state else None, message=message,
        )

    async def _spend_jti(self, db: AsyncSession, jti: str, expires_at: datetime | None) -> None:
        db.add(UsedJti(jti=jti, expires_at=expires_at or self.now()))
        try:
            await db.flush()
        except IntegrityError as exc:
            await db.rollback()
            raise Unauthorized("this attach token was already used; ask for a new one") from exc
        await db.commit()

    async def _secret_env(self, db: AsyncSession, org_id: str, user_id: str, names: Sequence[str]
                          ) -> dict[str, str]:
        if not names:
            return {}
        if self.secret_env is None:
            raise BadRequest(f"unknown secret: {names[0]}")
        return await self.secret_env.env_for(db, org_id, user_id, names)

    def _bounded_idle_timeout(self, who: Principal, requested: int | None) -> int | None:
        plan_limit = self.settings.idle_timeout_s or self.settings.plan_idle_timeout_s
        if requested is not None and requested > plan_limit:
            raise BadRequest(f"idle_timeout_s may be at most {plan_limit} on the {who.plan} plan")
        return requested

    def _compute_spec(self, inst: Instance, runner_token: str, secret_env: dict[str, str],
                      *, pull: bool = False, recording_max_bytes: int = 0) -> ComputeSpec:
        return ComputeSpec(
            session_id=inst.id, org_id=inst.org_id, user_id=inst.user_id, tier=inst.tier,
            resources=schemas.TIER_RESOURCES[inst.tier], repo_url=inst.repo_url, branch=inst.branch,
            program=inst.program, task=inst.task, api_url=self.settings.internal_api_url,
            gateway_public_key=self.gateway_public_key,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            needs_input_after_s=self.settings.needs_input_after_s, work_scan_s=self.settings.work_scan_s,
            runner_token=runner_token, secret_env=secret_env,
            services=list((inst.spec or {}).get("services") or []), pull=pull,
            max_services=self._max_services(inst), recording_max_bytes=recording_max_bytes,
        )

    def _max_services(self, inst: Instance) -> int:
        """The plan's limit when the session was created (older rows: the free plan's)."""
        value = (inst.spec or {}).get("max_services")
        return value if isinstance(value, int) else self.settings.services_free


def _start_message(kind: str, pull: bool) -> str | None:
    if kind == "woke":
        return "waking on connect"
    return "updating the workspace to the branch's head (--pull)" if pull else None
