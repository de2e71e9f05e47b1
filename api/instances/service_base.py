"""What every side of InstanceService shares: its state and the helpers (transitions, quota, launching
and failing sessions). The sides (user_side, scheduler_side, runner_side, gateway_side) are mixins of
ServiceBase; api/instances/service.py puts them together."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.auth import Principal
from api.db import tokens
from api.db.base import utcnow
from api.db.models import Event, Instance, Org, UsedJti, User, UserIdentity
from api.errors import (
    ComputeUnavailable,
    Forbidden,
    InvalidTransition,
    NotFound,
    QuotaExceeded,
    SandboxRequired,
    SessionFailed,
    Unauthorized,
    ValidationFailed,
)
from api.instances import access, repo_policy
from api.instances.providers.base import ComputeSpec, Provider, ProviderFailure
from api.instances.states import (
    ACTIVE_STATES,
    STARTABLE_STATES,
    State,
    check_transition,
)
from api.settings import Settings
from api.webhooks import outbox as webhook_outbox

# The name the module had before it was split: log filters and dashboards use it.
log = logging.getLogger("api.instances.service")

Clock = Callable[[], datetime]
# An UPDATE ... RETURNING(Instance) loads the new values even into an object the session already holds.
# Public: the gateway-facing side (gateway_side.py) issues the same kind of UPDATE.
REFRESH_RETURNING = {"populate_existing": True, "synchronize_session": False}
_NOT_YOURS = "session {id} belongs to someone else in your org; only its owner and org admins may use it"


class SecretEnvSource(Protocol):
    """Resolves the secret names a create request lists into environment values (see api/secrets)."""

    async def env_for(self, db: AsyncSession, org_id: str, user_id: str, names: Sequence[str]) -> dict[str, str]:
        ...


class ServiceBase:
    """State and helpers of InstanceService (see api/instances/service.py)."""

    if TYPE_CHECKING:  # the sides call each other's methods; InstanceService has them all
        async def complete_stop(self, inst: Instance, actor: str, reason: str) -> Instance: ...
        async def complete_delete(self, inst: Instance, actor: str) -> Instance: ...
        async def delete_instance(self, inst: Instance, actor: str, reason: str | None = None) -> Instance: ...

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

    async def _recording_on(self, org_id: str) -> bool:
        async with self.autocommit() as db:
            return bool(await db.scalar(select(Org.recording_enabled).where(Org.id == org_id)))

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
            raise access.no_such_session(session_id)
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
        # Read at each start; the uploads check the org's setting again (it may change while the session runs).
        recording = self.settings.recording_max_bytes if await self._recording_on(inst.org_id) else 0
        spec = self._compute_spec(inst, runner_token, secret_env, pull=pull, recording_max_bytes=recording)
        owner_name, owner_email = await self._owner_identity(inst.user_id)
        spec = dataclasses.replace(spec, owner_name=owner_name, owner_email=owner_email)
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
                .returning(Instance), execution_options=REFRESH_RETURNING,
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
                    **self._retire_runner_token(current),
                )
        release = self._stop_compute_quietly(row.id, dict(row.provider_state or inst.provider_state or {}))
        if release_later:
            self._spawn(release)
        else:
            await release
        return row

    def _retire_runner_token(self, inst: Instance) -> dict[str, Any]:
        """Row values that take the runner's token away, keeping its hash for the final recording upload.

        The runner uploads the last of its recording as it stops, which may be after its token is gone
        (a Kubernetes stop deletes the Pod, the runner gets SIGTERM, the row is marked stopped at once).
        The retired hash is accepted by the recording upload route alone (RunnerSide._runner_session),
        for as long as the provider lets a stopped runner live; every other route refuses it."""
        # Column names set to NULL, no secret in sight.
        values: dict[str, Any] = {"runner_token_prefix": None, "runner_token_hash": None}  # nosec B105
        if inst.runner_token_hash:  # else: a grace from an earlier retirement stays as it was
            values.update(recording_grace_token_hash=inst.runner_token_hash,
                          recording_grace_until=self.now() + timedelta(seconds=self.provider.runner_stop_grace_s))
        return values

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
            .returning(Instance), execution_options=REFRESH_RETURNING,
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
            raise ValidationFailed.of("secrets", f"unknown secret: {names[0]}")
        return await self.secret_env.env_for(db, org_id, user_id, names)

    def _bounded_idle_timeout(self, who: Principal, requested: int | None) -> int | None:
        plan_limit = self.settings.idle_timeout_s or self.settings.plan_idle_timeout_s
        if requested is not None and requested > plan_limit:
            raise ValidationFailed.of("idle_timeout_s",
                                      f"idle_timeout_s may be at most {plan_limit} on the {who.plan} plan")
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

    async def _owner_identity(self, user_id: str) -> tuple[str, str]:
        """The session owner's name and email for git commits made in the session (docs/cli.md)."""
        async with self.autocommit() as db:
            email = await db.scalar(select(User.email).where(User.id == user_id))
            login = await db.scalar(
                select(UserIdentity.login).where(UserIdentity.user_id == user_id, UserIdentity.login.is_not(None))
                .order_by(UserIdentity.last_signin_at.desc().nulls_last()).limit(1))
        return owner_identity(user_id, email, login, self.settings.public_api_url)

    def _max_services(self, inst: Instance) -> int:
        """The plan's limit when the session was created (older rows: the free plan's)."""
        value = (inst.spec or {}).get("max_services")
        return value if isinstance(value, int) else self.settings.services_free


def _one_line(text: str | None, limit: int) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in (text or "")).split())[:limit]


def owner_identity(user_id: str, email: str | None, login: str | None, public_url: str) -> tuple[str, str]:
    """(name, email) for git: the platform's email for the user, else ``<user id>@users.noreply.<API host>``;
    the sign-in login as the name, else the email's local part, else the user id."""
    address = _one_line(email, 254)
    if not _EMAIL_RE.fullmatch(address):
        host = urlsplit(public_url).hostname or "localhost"
        address = f"{user_id}@users.noreply.{host}"
    name = _one_line(login, 255) or address.split("@", 1)[0] or user_id
    return name, address


_EMAIL_RE = re.compile(r"[^@\s<>]+@[^@\s<>]+")


def _start_message(kind: str, pull: bool) -> str | None:
    if kind == "woke":
        return "waking on connect"
    return "updating the workspace to the branch's head (--pull)" if pull else None
