"""The idle reaper with a fake clock and the FakeProvider: idle stop, activity, heartbeats, retention."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.db.models import Org
from api.instances.limits import effective_idle_timeout_s, effective_retention_s
from api.instances.providers.fake import FakeProvider
from api.instances.service import InstanceService
from api.jobs.reap_idle import IdleReaper, ReapReport
from api.jobs.scheduler import LifecycleScheduler
from api.settings import Settings
from tests.api.lifecycle_support import FakeClock, World, principal
from tests.conftest import both_databases


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def world(settings: Settings, sessions: async_sessionmaker[AsyncSession], clock: FakeClock) -> World:
    provider = FakeProvider()
    service = InstanceService(settings, sessions, provider, clock=clock)
    return World(await principal(sessions, "acme"), service, provider, clock)


@pytest.fixture
def sched(settings: Settings, sessions: async_sessionmaker[AsyncSession], world: World) -> LifecycleScheduler:
    return LifecycleScheduler(settings, sessions, world.provider, clock=world.clock)


async def reap(sched: LifecycleScheduler) -> ReapReport:
    report = await sched.run_job("reap")
    assert isinstance(report, ReapReport), "this replica should lead"
    return report


async def stay_quiet(world: World, session_id: str, minutes: float, **heartbeat: object) -> None:
    """Let time pass with heartbeats (40 s apart, well inside 3 intervals) reporting no activity."""
    remaining = minutes * 60
    while remaining > 0:
        step = min(40.0, remaining)
        world.clock.advance(step)
        remaining -= step
        await world.heartbeat(session_id, **heartbeat)


@both_databases
async def test_idle_29_minutes_survives_31_minutes_stopped(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    assert inst.state == "running"
    await stay_quiet(world, inst.id, 29)
    assert (await reap(sched)).stopped == []
    assert (await world.row(inst.id)).state == "running"

    await stay_quiet(world, inst.id, 2)
    assert (await reap(sched)).stopped == [inst.id]
    row = await world.row(inst.id)
    assert (row.state, row.reason) == ("stopped", "idle")
    assert world.provider.phases[inst.id] == "stopped"  # compute released, workspace kept
    stop_events = [e for e in await world.events(inst.id) if e.kind in ("stopping", "stopped")]
    assert [(e.actor, e.to_state) for e in stop_events] == [("scheduler", "stopping"), ("scheduler", "stopped")]
    assert "idle" in (stop_events[0].message or "")


async def test_fresh_pane_output_keeps_an_unattended_session(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 25)
    # The agent prints something with nobody attached: that is activity.
    await world.heartbeat(inst.id, last_output_at=world.clock() - timedelta(seconds=5))
    await stay_quiet(world, inst.id, 25)
    assert (await reap(sched)).stopped == []
    assert (await world.row(inst.id)).state == "running"
    await stay_quiet(world, inst.id, 6)
    assert (await reap(sched)).stopped == [inst.id]


async def test_attached_but_silent_client_keeps_the_session(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 120, attached_clients=1)
    assert (await reap(sched)).stopped == []
    assert (await world.row(inst.id)).state == "running"


async def test_input_counts_as_activity(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 20)
    await world.heartbeat(inst.id, last_input_at=world.clock())
    await stay_quiet(world, inst.id, 20)
    assert (await reap(sched)).stopped == []


async def test_a_just_woken_session_is_not_reaped(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 31)
    assert (await reap(sched)).stopped == [inst.id]
    world.clock.advance(days=1)
    reply = await world.service.authorize(schemas.AuthorizeRequest(
        session_id=inst.id, user_id=world.who.user_id, method="certificate", wake=True))
    assert reply.state == "starting"
    await world.heartbeat(inst.id)
    assert (await world.row(inst.id)).state == "running"
    # last_activity_at is a day old, but the session just started.
    assert (await reap(sched)).stopped == []


async def test_activity_between_read_and_stop_wins(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 31)
    stale = await world.row(inst.id)
    await world.heartbeat(inst.id, last_output_at=world.clock())
    idle_since = world.clock() - timedelta(minutes=30)
    assert await world.service.stop_if_idle(stale, idle_since, "scheduler", "idle") is None
    assert (await world.row(inst.id)).state == "running"


@both_databases
async def test_missing_heartbeats_unhealthy_then_failed(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    world.clock.advance(59)  # fewer than 3 intervals of 20 s
    assert (await reap(sched)).unhealthy == []
    world.clock.advance(2)
    assert (await reap(sched)).unhealthy == [inst.id]
    row = await world.row(inst.id)
    assert row.state == "unhealthy" and "no heartbeat" in (row.reason or "")

    # Heartbeats that resume bring it back.
    await world.heartbeat(inst.id)
    assert (await world.row(inst.id)).state == "running"

    world.clock.advance(61)
    assert (await reap(sched)).unhealthy == [inst.id]
    world.clock.advance(minutes=8)  # 9 min silent: not yet
    assert (await reap(sched)).failed == []
    world.clock.advance(minutes=1, seconds=5)
    assert (await reap(sched)).failed == [inst.id]
    row = await world.row(inst.id)
    assert row.state == "failed" and "no heartbeat" in (row.reason or "")
    assert world.provider.phases[inst.id] == "stopped"  # compute released
    assert row.route_host is None and row.runner_token_hash is None
    failed = [e for e in await world.events(inst.id) if e.to_state == "failed"]
    assert failed and failed[-1].actor == "scheduler" and "no heartbeat" in (failed[-1].message or "")


@both_databases
async def test_retention_deletes_a_stopped_session_after_its_time(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await world.service.stop(world.who, inst.id)
    world.clock.advance(days=7, seconds=-60)
    assert (await reap(sched)).deleted == []
    world.clock.advance(120)
    assert (await reap(sched)).deleted == [inst.id]
    row = await world.row(inst.id)
    assert row.state == "deleted" and row.deleted_at == world.clock()
    assert inst.id not in world.provider.phases  # workspace gone too
    deleting = [e for e in await world.events(inst.id) if e.to_state == "deleting"]
    assert deleting[0].actor == "scheduler" and "retention" in (deleting[0].message or "")


async def test_org_retention_override_and_failed_sessions(world: World, sched: LifecycleScheduler) -> None:
    await world.set_org(retention_s=3600)
    stopped = await world.new_running()
    await world.service.stop(world.who, stopped.id)
    failed = await world.new_running()
    await world.service.fail_instance(failed, "runner", "clone failed")
    world.clock.advance(minutes=59)
    assert (await reap(sched)).deleted == []
    world.clock.advance(minutes=2)
    assert sorted((await reap(sched)).deleted) == sorted([stopped.id, failed.id])


async def test_per_session_idle_timeout(world: World, sched: LifecycleScheduler) -> None:
    short = await world.new_running(idle_timeout_s=600)
    default = await world.new_running()
    for sid in (short.id, default.id):
        await world.heartbeat(sid)
    for _ in range(27):  # 9 minutes
        world.clock.advance(20)
        await world.heartbeat(short.id)
        await world.heartbeat(default.id)
    assert (await reap(sched)).stopped == []
    for _ in range(6):  # 11 minutes
        world.clock.advance(20)
        await world.heartbeat(short.id)
        await world.heartbeat(default.id)
    assert (await reap(sched)).stopped == [short.id]


async def test_org_idle_timeout_bounds_the_session_override(world: World, sched: LifecycleScheduler) -> None:
    await world.set_org(idle_timeout_s=300)
    asked_more = await world.new_running(idle_timeout_s=1200)  # allowed by the plan, capped by the org
    await stay_quiet(world, asked_more.id, 4)
    assert (await reap(sched)).stopped == []
    await stay_quiet(world, asked_more.id, 2)
    assert (await reap(sched)).stopped == [asked_more.id]


async def test_deployment_idle_timeout_setting(settings: Settings, sessions: async_sessionmaker[AsyncSession],
                                               clock: FakeClock) -> None:
    settings = settings.model_copy(update={"idle_timeout_s": 120})
    provider = FakeProvider()
    world = World(await principal(sessions, "small"), InstanceService(settings, sessions, provider, clock=clock),
                  provider, clock)
    sched = LifecycleScheduler(settings, sessions, provider, clock=clock)
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 1.5)
    assert (await reap(sched)).stopped == []
    await stay_quiet(world, inst.id, 1)
    assert (await reap(sched)).stopped == [inst.id]


def test_effective_timeouts_resolution(settings: Settings) -> None:
    org = Org(name="o", plan="free", idle_timeout_s=None, retention_s=None)
    assert effective_idle_timeout_s(settings, None, None) == 1800
    assert effective_idle_timeout_s(settings, org, 600) == 600
    assert effective_idle_timeout_s(settings, org, 7200) == 1800  # bounded by the plan
    deploy = settings.model_copy(update={"idle_timeout_s": 900})
    assert effective_idle_timeout_s(deploy, org, None) == 900
    org.idle_timeout_s = 300
    assert effective_idle_timeout_s(deploy, org, None) == 300
    assert effective_idle_timeout_s(deploy, org, 600) == 300
    assert effective_idle_timeout_s(deploy, org, True) == 300  # junk in the spec is ignored
    assert effective_retention_s(settings, None) == 7 * 24 * 3600
    org.retention_s = 60
    assert effective_retention_s(settings, org) == 60


async def test_reaper_skips_a_session_that_moved_on(world: World, settings: Settings) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 31)
    world.provider.fail_next = "node went away"
    report = await IdleReaper(world.service, settings).run_once()
    # The provider refused the stop: the session is failed with the reason, the pass went on.
    assert report.stopped == [inst.id]
    row = await world.row(inst.id)
    assert row.state == "failed" and "node went away" in (row.reason or "")


async def test_reaper_stops_early_when_the_lease_is_lost(world: World, settings: Settings) -> None:
    inst = await world.new_running()
    await stay_quiet(world, inst.id, 31)
    report = await IdleReaper(world.service, settings).run_once(keep_going=lambda: False)
    assert report.stopped == []
    assert (await world.row(inst.id)).state == "running"
