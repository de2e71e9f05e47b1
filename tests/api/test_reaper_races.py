"""The idle reaper against a user arriving at the same moment: the user wins or is told to wait, never
cut off (issue #20's soak: `ssh host cmd` failed when the reaper stopped the session under it)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.db.models import Instance
from api.instances.providers.fake import FakeProvider
from api.instances.service import InstanceService
from api.jobs.reap_idle import IdleReaper
from api.settings import Settings
from tests.api.lifecycle_support import FakeClock, World, principal
from tests.conftest import both_databases

IDLE = timedelta(minutes=30)  # the default plan's idle timeout


@pytest.fixture
async def world(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> World:
    clock = FakeClock()
    provider = FakeProvider()
    return World(await principal(sessions, "acme"), InstanceService(settings, sessions, provider, clock=clock),
                 provider, clock)


def connect(world: World, session_id: str, *, wake: bool = True, jti: str | None = None) -> schemas.AuthorizeRequest:
    return schemas.AuthorizeRequest(session_id=session_id, user_id=world.who.user_id, method="certificate",
                                    wake=wake, jti=jti)


async def quiet_for(world: World, session_id: str, span: timedelta) -> None:
    """Heartbeats 40 s apart that report no activity, for ``span``."""
    left = span.total_seconds()
    while left > 0:
        step = min(40.0, left)
        world.clock.advance(step)
        left -= step
        await world.heartbeat(session_id)


@both_databases
@pytest.mark.parametrize("wake", [True, False], ids=["new-connection", "new-channel"])
async def test_a_user_arriving_after_the_reaper_looked_keeps_the_session(world: World, wake: bool) -> None:
    inst = await world.new_running()
    await quiet_for(world, inst.id, IDLE + timedelta(minutes=1))
    seen_by_reaper = await world.row(inst.id)  # the reaper's pass read the row: idle for 31 minutes

    reply = await world.service.authorize(connect(world, inst.id, wake=wake, jti="jti-1" if wake else None))
    assert reply.state == "running" and reply.route is not None

    # The reaper's guard UPDATE comes next: the connection that was just let in counts as activity.
    stopped = await world.service.stop_if_idle(seen_by_reaper, world.clock() - IDLE, "scheduler", "idle")
    assert stopped is None
    assert (await world.row(inst.id)).state == "running"
    assert world.provider.phases[inst.id] == "running"


@both_databases
async def test_a_user_arriving_while_the_reaper_stops_is_told_to_wait(
        world: World, sessions: async_sessionmaker[AsyncSession]) -> None:
    """The reaper holds the row (its guard UPDATE) while the connection's authorize runs: the authorize
    waits for it and answers `stopping` (the gateway waits, then wakes it), never `running` with a route
    to a runner that is going away."""
    inst = await world.new_running()
    await quiet_for(world, inst.id, IDLE + timedelta(minutes=1))
    engine = sessions.kw["bind"]
    writing = asyncio.Event()

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sets = statement.upper().split(" WHERE ")[0]
        if sets.lstrip().startswith("UPDATE INSTANCES SET") and "LAST_ACTIVITY_AT" in sets:
            writing.set()

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        async with sessions() as reaper:
            # As stop_if_idle does: the guard UPDATE takes the row's write lock first.
            await reaper.execute(update(Instance).where(Instance.id == inst.id).values(updated_at=world.clock()))
            # (No jti: spending one is a write of its own, which would wait on the lock before ours.)
            authorize = asyncio.create_task(world.service.authorize(connect(world, inst.id)))
            waiting = asyncio.create_task(writing.wait())
            # Either the authorize is at its write (and waits on the lock), or it already answered.
            await asyncio.wait({authorize, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            await reaper.execute(update(Instance).where(Instance.id == inst.id).values(state="stopping"))
            await reaper.commit()
        reply = await authorize
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)
    assert (reply.state, reply.route) == ("stopping", None)


async def test_two_connections_waking_one_session_both_get_in(world: World) -> None:
    inst = await world.new_running()
    await world.service.stop(world.who, inst.id)
    replies = await asyncio.gather(*(world.service.authorize(connect(world, inst.id)) for _ in range(4)))
    assert {r.state for r in replies} == {"starting"}
    assert [c[0] for c in world.provider.calls].count("start") == 1


@both_databases
async def test_heartbeats_coming_back_are_not_activity(world: World, settings: Settings) -> None:
    """On a busy host heartbeats come late: unhealthy, then running again. That is no user activity, and
    a session flapping so must still be stopped when idle (the soak's idle-reaped op waited forever)."""
    inst = await world.new_running()
    reaper = IdleReaper(world.service, settings)
    for _ in range(4):  # every 10 minutes the runner misses its heartbeats for a minute
        await quiet_for(world, inst.id, timedelta(minutes=9))
        world.clock.advance(61)
        assert (await reaper.run_once()).unhealthy == [inst.id]
        await world.heartbeat(inst.id)
        assert (await world.row(inst.id)).state == "running"
    assert (await reaper.run_once()).stopped == [inst.id]
    assert (await world.row(inst.id)).reason == "idle"


@both_databases
async def test_stopping_a_session_the_reaper_is_stopping_is_not_a_conflict(world: World) -> None:
    inst = await world.new_running()
    await quiet_for(world, inst.id, IDLE + timedelta(minutes=1))
    async with world.service.db_sessions() as db:  # the reaper is mid-stop
        await db.execute(update(Instance).where(Instance.id == inst.id).values(state="stopping"))
        await db.commit()
    assert (await world.service.stop(world.who, inst.id)).state == "stopping"

    # A stop that read the session running just before the reaper stopped it gets the stopped session.
    stale = await world.row(inst.id)
    stale.state = "running"
    await world.service.complete_stop(await world.row(inst.id), "scheduler", "idle")
    assert (await world.service.stop_instance(stale, world.who.actor, "stopped by user")).state == "stopped"


async def test_a_heartbeat_never_moves_activity_back(world: World, settings: Settings,
                                                     sessions: async_sessionmaker[AsyncSession]) -> None:
    """A heartbeat reads the row, then writes: an attach counted as activity in between must survive it
    (else the reaper could stop a session a user just connected to)."""
    inst = await world.new_running()
    await quiet_for(world, inst.id, timedelta(minutes=5))
    arrived = world.clock()
    engine = sessions.kw["bind"]
    database = settings.database_url.split("///", 1)[1]

    done: list[bool] = []

    def attach_meanwhile(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sets = statement.upper().split(" WHERE ")[0]
        if not done and sets.startswith("UPDATE INSTANCES SET") and "LAST_HEARTBEAT_AT" in sets:
            done.append(True)
            with contextlib.closing(sqlite3.connect(database)) as other:  # another API process's write
                other.execute("UPDATE instances SET last_activity_at = ? WHERE id = ?",
                              (arrived.strftime("%Y-%m-%d %H:%M:%S.%f"), inst.id))
                other.commit()

    event.listen(engine.sync_engine, "before_cursor_execute", attach_meanwhile)
    try:
        # The runner saw output a minute ago: older than the attach.
        await world.heartbeat(inst.id, last_output_at=arrived - timedelta(minutes=1))
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", attach_meanwhile)
    assert done
    assert (await world.row(inst.id)).last_activity_at == arrived
