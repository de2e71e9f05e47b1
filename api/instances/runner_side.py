"""InstanceService, runner side (api/instances/service.py puts the sides together)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api import schemas
from api.db import tokens
from api.db.models import Event, Instance, Org
from api.errors import (
    ComputeUnavailable,
    Forbidden,
    InvalidTransition,
    OrzError,
    Unauthorized,
)
from api.instances import recordings
from api.instances.event_budget import DROPPED_KIND, WORK_NOT_PUSHED_KIND, EventBudget
from api.instances.providers.base import ProviderFailure
from api.instances.service_base import ServiceBase
from api.instances.states import (
    GONE_STATES,
    State,
)
from api.webhooks import outbox as webhook_outbox

# The name the module had before it was split: log filters and dashboards use it.
log = logging.getLogger("api.instances.service")
_WORK_REASON_MAX = 300  # of git's reason, in the event (the work: line and `status --json` keep all of it)


class RunnerSide(ServiceBase):
    """What runners report: heartbeats, services, program events."""

    async def _runner_session(self, db: AsyncSession, session_id: str, runner_token: str, *,
                              recording: bool = False) -> Instance:
        """The session whose current runner holds ``runner_token``; Unauthorized otherwise.

        With ``recording`` (the upload route, and a heartbeat carrying the final work report), also the
        runner a stop or failure just retired, until its grace ends (ServiceBase._retire_runner_token says why)."""
        inst = await db.get(Instance, session_id)
        if inst is None or not tokens.looks_like(runner_token, tokens.RUNNER_TOKEN_PREFIX):
            raise Unauthorized("invalid runner token")
        if inst.runner_token_hash and tokens.matches(runner_token, inst.runner_token_hash):
            return inst
        if (
            recording
            and inst.recording_grace_token_hash
            and inst.recording_grace_until is not None
            and self.now() <= inst.recording_grace_until
            and State(inst.state) not in GONE_STATES
            and tokens.matches(runner_token, inst.recording_grace_token_hash)
        ):
            return inst
        raise Unauthorized("invalid runner token")

    async def upload_recording(self, session_id: str, runner_token: str, part: str, offset: int, data: bytes
                               ) -> schemas.RecordingAck:
        """Append a runner's upload to its session's recording (api/instances/recordings.py says how)."""
        async with self.db_sessions() as db:
            inst = await self._runner_session(db, session_id, runner_token, recording=True)
            # Checked at each upload, not only at start: an org that turns recording off stops it at once.
            if not await db.scalar(select(Org.recording_enabled).where(Org.id == inst.org_id)):
                raise Forbidden(f"recording is turned off for the org of session {session_id}")
            return await recordings.append(db, session_id, part, offset, data, self.settings.recording_max_bytes)

    async def record_heartbeat(self, session_id: str, runner_token: str, hb: schemas.Heartbeat
                               ) -> schemas.HeartbeatReply:
        async with self.db_sessions() as db:
            inst = await self._runner_session(db, session_id, runner_token, recording=hb.work is not None
                                              and hb.work.final)
            if not (inst.runner_token_hash and tokens.matches(runner_token, inst.runner_token_hash)):
                # A runner a stop retired (a Kubernetes stop marks the row stopped as the Pod is deleted): its
                # final work report is still what a delete of the stopped session must decide on; nothing else.
                if State(inst.state) not in (State.STOPPING, State.STOPPED, State.FAILED) or hb.work is None:
                    raise Unauthorized("invalid runner token")
                before = inst.work
                await db.execute(update(Instance).where(Instance.id == inst.id).values(work=stored_work(hb.work)))
                await self._work_not_pushed(db, inst, before, hb.work)
                await db.commit()
                return schemas.HeartbeatReply(state=inst.state, heartbeat_interval_s=self.settings.heartbeat_interval_s)
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
                route = (hb.ssh_host, hb.ssh_port, hb.host_key)
                if not hb.ssh_host or route == (inst.route_host, inst.route_port, inst.runner_host_key) or (
                        await self.provider.runner_endpoint_ok(session_id, inst.provider_state or {},
                                                               hb.ssh_host, hb.ssh_port)):
                    values.update(route_host=hb.ssh_host, route_port=hb.ssh_port, runner_host_key=hb.host_key)
                else:
                    # The gateway would take its users (and the client key every runner trusts) there.
                    log.warning("session %s: its runner named %s port %d as its endpoint, not its own; ignored",
                                session_id, hb.ssh_host, hb.ssh_port)
            activity = [t for t in (hb.last_input_at, hb.last_output_at) if t is not None]
            if hb.attached_clients > 0:
                activity.append(now)
            latest = max(activity, default=None)
            if latest is not None:
                latest = min(latest, now)  # a runner clock ahead of ours must not postpone reaping
                if inst.last_activity_at is None or latest > inst.last_activity_at:
                    # Never backwards, also against a write since the read above (an attach's, which
                    # counts a user arriving as activity): a stale heartbeat must not reopen the reaper's door.
                    values["last_activity_at"] = case(
                        (or_(Instance.last_activity_at.is_(None), Instance.last_activity_at < latest), latest),
                        else_=Instance.last_activity_at)
            if hb.work is not None:
                # Its texts (a git error, a branch name) are the session's: stored as one line with every
                # control character shown as U+FFFD, as org admins and the delete refusal read them.
                values["work"] = stored_work(hb.work)
            changed = self._agent_change(inst, hb)
            if changed:
                # The row always says what the agent is doing; the timeline (and webhooks) only within budget.
                values.update(agent_state=hb.agent_state, agent_message=hb.agent_message,
                              agent_exit_code=hb.agent_exit_code, agent_state_at=now)
            agent_before, work_before = inst.agent_state, inst.work  # the UPDATE below sets the loaded row's
            # The row first: it makes this session's heartbeats take turns for the budget (event_budget.py).
            await db.execute(update(Instance).where(Instance.id == inst.id).values(**values))
            if changed or hb.program_events:
                budget = await EventBudget.load(db, inst.id, self.settings.runner_events_per_min, now)
                if changed and self._runner_event_allowed(db, inst, budget):
                    # from/to hold agent states here (kind "agent"), not session states.
                    event = Event(instance_id=inst.id, org_id=inst.org_id, at=now, actor="runner", kind="agent",
                                  from_state=agent_before, to_state=hb.agent_state, message=changed)
                    db.add(event)
                    await webhook_outbox.enqueue(db, inst, event, agent_message=hb.agent_message,
                                                 exit_code=hb.agent_exit_code)
                for pe in hb.program_events or ():
                    if self._runner_event_allowed(db, inst, budget):
                        db.add(self._event(inst, "runner", pe.kind, None, None, pe.message))
                        log.info("session %s: %s", inst.id, pe.message,
                                 extra={"event": "program", "session_id": inst.id})
            if hb.work is not None:
                await self._work_not_pushed(db, inst, work_before, hb.work)
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

    async def _work_not_pushed(self, db: AsyncSession, inst: Instance, before: dict[str, Any] | None,
                               work: schemas.WorkState) -> None:
        """An event when a final work report says the push to orz/<id> failed (once per report, within the
        runner's event budget): the reason is in `orz cloud status`, not only in the runner's log."""
        if not (work.final and work.wip_error):
            return
        stored = stored_work(work)
        if before and before.get("final") and before.get("wip_error") == stored["wip_error"] and (
                before.get("scanned_at") == stored["scanned_at"]):
            return  # the same report again (a retried last word)
        budget = await EventBudget.load(db, inst.id, self.settings.runner_events_per_min, self.now())
        if not self._runner_event_allowed(db, inst, budget):
            return
        reason = " ".join(stored["wip_error"].split())
        if len(reason) > _WORK_REASON_MAX:
            reason = reason[:_WORK_REASON_MAX - 3] + "..."
        db.add(self._event(inst, "runner", WORK_NOT_PUSHED_KIND, None, None,
                           f"could not push the session's work to orz/{inst.id}: {reason}"))

    def _runner_event_allowed(self, db: AsyncSession, inst: Instance, budget: EventBudget) -> bool:
        """Spend one of the session's runner events; past the budget, add one note per spell instead."""
        taken = budget.take()
        if taken:
            return True
        if taken is False:
            log.warning("session %s: its runner sends more than %d events a minute; leaving the rest out",
                        inst.id, self.settings.runner_events_per_min)
            db.add(self._event(inst, "system", DROPPED_KIND, None, None,
                               f"the runner sent more than {self.settings.runner_events_per_min} events a minute "
                               "(program exits, agent-state changes); the rest are left out"))
        return False

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
                .values({
                    # The replaced Pod's runner may still send its last recording upload.
                    **self._retire_runner_token(inst),
                    "spec": {**(inst.spec or {}), "services": wanted}, "runner_token_prefix": token.prefix,
                    "runner_token_hash": token.digest, "route_host": None, "route_port": None,
                    "runner_host_key": None, "updated_at": self.now(),
                })
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


def stored_work(work: schemas.WorkState) -> dict[str, Any]:
    """A work report as the row keeps it. Its texts (a git error, a branch name, file names) are the
    session's: stored as one line each with every control character shown as U+FFFD, as org admins and the
    delete refusal read them."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return schemas.scrub_controls(value, "line")
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return {k: scrub(v) for k, v in work.model_dump(mode="json").items()}
