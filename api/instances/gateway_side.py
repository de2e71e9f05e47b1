"""InstanceService, gateway side (api/instances/service.py puts the sides together)."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from api import metrics, schemas
from api.auth import Principal
from api.db.models import Event, Instance, Org, User
from api.errors import (
    ComputeUnavailable,
    Conflict,
    InvalidTransition,
    NotFound,
    OrzError,
    QuotaExceeded,
    SessionFailed,
)
from api.instances import access
from api.instances.service_base import REFRESH_RETURNING, ServiceBase
from api.instances.states import (
    ACTIVE_STATES,
    ATTACHABLE_STATES,
    State,
)

_ATTACHABLE = [s.value for s in ATTACHABLE_STATES]


class GatewaySide(ServiceBase):
    """What the gateway asks: may this user attach, and where; access checks; attach events."""

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
            if State(inst.state) in ATTACHABLE_STATES:
                inst = await self._attach_is_activity(db, inst)
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

    async def _attach_is_activity(self, db: AsyncSession, inst: Instance) -> Instance:
        """A user arriving (a connection, or a channel on one) is activity: the idle clock restarts now.

        The conditional UPDATE meets the reaper's guard UPDATE (api/instances/scheduler_side.py
        stop_if_idle) on the row: whichever writes first wins. Before the reaper, the guard then finds
        fresh activity and leaves the session running; after it, this finds the session stopping and
        the reply says so, for the gateway to wait and wake it (gateway/routing.py until_running).
        PostgreSQL re-evaluates the WHERE after the other's row lock is released; SQLite writes one at a
        time, each BEGIN IMMEDIATE seeing the last commit (api/db/sqlite_writes.py).
        """
        row = await db.scalar(
            update(Instance)
            .where(Instance.id == inst.id, Instance.state.in_(_ATTACHABLE))
            .values(last_activity_at=self.now())
            .returning(Instance), execution_options=REFRESH_RETURNING,
        )
        await db.commit()
        if row is not None:
            return row
        fresh = await db.get(Instance, inst.id, populate_existing=True)
        if fresh is None:
            raise NotFound(f"no such session: {inst.id}")
        return fresh

    async def _wake(self, inst: Instance, plan: str, user_id: str) -> Instance:
        """Start a stopped session because someone attaches to it (wake on connect), counted by result."""
        try:
            woken = await self._start_row(inst, plan, f"user:{user_id}", kind="woke")
        except InvalidTransition:
            # Another connection (or a channel of this one) woke it first: that start serves us too.
            async with self.db_sessions() as db:
                fresh = await db.get(Instance, inst.id)
            if fresh is None or State(fresh.state) not in ACTIVE_STATES:
                raise
            return fresh
        except QuotaExceeded:
            metrics.SESSION_WAKES.labels(result="quota").inc()
            raise
        except ComputeUnavailable:
            metrics.SESSION_WAKES.labels(result="provider_error").inc()
            raise
        except OrzError as exc:
            # A refusal of the user's making (a secret it names was deleted: 422) is no outage of ours.
            metrics.SESSION_WAKES.labels(result="invalid" if exc.status < 500 else "error").inc()
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
