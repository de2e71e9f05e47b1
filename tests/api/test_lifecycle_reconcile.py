"""The reconciler with a fake clock and the FakeProvider: vanished compute, orphans, stuck transitions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.db.models import Instance
from api.instances.providers.fake import FakeProvider
from api.instances.service import InstanceService
from api.jobs.reconcile import ReconcileReport
from api.jobs.scheduler import LifecycleScheduler
from api.settings import Settings
from tests.api.lifecycle_support import FakeClock, World, principal
from tests.conftest import both_databases


@pytest.fixture
async def world(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> World:
    clock, provider = FakeClock(), FakeProvider()
    service = InstanceService(settings, sessions, provider, clock=clock)
    return World(await principal(sessions, "acme"), service, provider, clock)


@pytest.fixture
def sched(settings: Settings, sessions: async_sessionmaker[AsyncSession], world: World) -> LifecycleScheduler:
    return LifecycleScheduler(settings, sessions, world.provider, clock=world.clock)


async def reconcile(sched: LifecycleScheduler) -> ReconcileReport:
    report = await sched.run_job("reconcile")
    assert isinstance(report, ReconcileReport), "this replica should lead"
    return report


async def force_state(world: World, session_id: str, state: str, age_s: float) -> None:
    """Put a row in a state as if a request had crashed half-way, ``age_s`` ago."""
    async with world.service.db_sessions() as db:
        await db.execute(update(Instance).where(Instance.id == session_id).values(
            state=state, state_changed_at=world.clock() - timedelta(seconds=age_s)))
        await db.commit()


@both_databases
async def test_vanished_compute_is_marked_and_restarted_once_then_failed(
        world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    world.clock.advance(5)
    world.provider.phases.pop(inst.id)  # the pod / process disappears behind the API's back

    report = await reconcile(sched)
    assert report.restarted == [inst.id]
    row = await world.row(inst.id)
    assert row.state == "starting"
    assert world.provider.calls[-1] == ("start", inst.id)
    events = await world.events(inst.id)
    failed = [e for e in events if e.to_state == "failed"]
    assert failed[-1].actor == "scheduler" and "compute vanished" in (failed[-1].message or "")
    assert events[-1].kind == "retrying" and events[-1].to_state == "starting"

    # Back up, then it vanishes again within the hour: no second restart.
    await world.heartbeat(inst.id)
    assert (await world.row(inst.id)).state == "running"
    world.clock.advance(minutes=10)
    await world.heartbeat(inst.id)
    world.provider.phases[inst.id] = "failed"
    report = await reconcile(sched)
    assert report.failed == [inst.id] and report.restarted == []
    row = await world.row(inst.id)
    assert row.state == "failed" and "compute vanished" in (row.reason or "") and "giving up" in (row.reason or "")


@both_databases
async def test_the_providers_word_on_why_compute_failed_reaches_the_user(
        world: World, sched: LifecycleScheduler) -> None:
    """Kubernetes evicting a Pod for filling its disk says so; the session's failure (and the restart that
    follows) carries that, not only "compute vanished"."""
    inst = await world.new_running()
    world.clock.advance(5)
    why = "the session wrote more than 2Gi to /tmp, and Kubernetes stopped it (Evicted)"
    world.provider.phases[inst.id], world.provider.messages[inst.id] = "failed", why
    report = await reconcile(sched)
    assert report.restarted == [inst.id]
    failed = [e for e in await world.events(inst.id) if e.to_state == "failed"]
    assert failed and why in (failed[-1].message or "")


@both_databases
async def test_the_providers_word_is_one_short_line(world: World, sched: LifecycleScheduler,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The local provider's word is the session's own fatal_error file, which code in the session writes:
    up to 4 KB of any bytes. The reason (and the server log's reconcile line) gets a clipped line of it,
    without the escape sequences that would drive the operator's terminal or forge log lines."""
    inst = await world.new_running()
    world.clock.advance(5)
    why = "disk full\x1b[2J\r\nreconcile: session s-other restarted\x00" + "x" * 4000
    world.provider.phases[inst.id], world.provider.messages[inst.id] = "failed", why
    caplog.set_level("INFO", logger="api.jobs.reconcile")
    await reconcile(sched)
    failed = [e for e in await world.events(inst.id) if e.to_state == "failed"]
    told = failed[-1].message or ""
    assert "disk full" in told and "reconcile: session s-other restarted" in told
    assert len(told) < 500 and not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in told), told
    logged = [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()]
    assert logged and all(len(line) < 600 and "\x1b" not in line and "\n" not in line for line in logged)


@both_databases
async def test_orphan_compute_is_removed_and_its_workspace_kept(world: World, sched: LifecycleScheduler) -> None:
    kept = await world.new_running()
    world.provider.phases["ghost-abc123"] = "running"
    world.provider.phases["ghost-def456"] = "stopped"  # a workspace only: nothing runs, nothing to release
    report = await reconcile(sched)
    assert report.orphans_stopped == ["ghost-abc123"]
    assert world.provider.phases["ghost-abc123"] == "stopped"
    assert ("stop", "ghost-abc123") in world.provider.calls
    assert not any(sid == "ghost-def456" for _op, sid in world.provider.calls)
    assert world.provider.phases[kept.id] == "running"
    assert (await world.row(kept.id)).state == "running"


async def test_compute_of_stopped_and_deleted_sessions_is_released(world: World, sched: LifecycleScheduler) -> None:
    stopped = await world.new_running()
    await world.service.stop(world.who, stopped.id)
    deleted = await world.new_running()
    await world.service.delete(world.who, deleted.id)
    # Something restarted them behind the API's back (a crashed stop, a stray controller).
    world.provider.phases[stopped.id] = "running"
    world.provider.phases[deleted.id] = "running"
    world.clock.advance(5)
    report = await reconcile(sched)
    assert report.orphans_stopped == [stopped.id]
    assert report.orphans_deleted == [deleted.id]
    assert world.provider.phases[stopped.id] == "stopped"  # workspace kept
    assert deleted.id not in world.provider.phases
    assert (await world.row(stopped.id)).state == "stopped"
    kinds = [e.kind for e in await world.events(stopped.id)]
    assert kinds[-1] == "compute_stopped"


async def test_a_stopped_session_with_stopped_compute_is_left_alone(world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    await world.service.stop(world.who, inst.id)
    world.clock.advance(minutes=5)
    calls = len(world.provider.calls)
    report = await reconcile(sched)
    assert report == ReconcileReport()
    assert len(world.provider.calls) == calls


async def test_stuck_starting_is_retried_once_then_failed(world: World, sched: LifecycleScheduler,
                                                          settings: Settings) -> None:
    created = await world.service.create(world.who, schemas.InstanceCreate())
    assert created.state == "starting"  # the FakeProvider's runner never reports
    world.clock.advance(settings.start_timeout_s - 5)
    assert await reconcile(sched) == ReconcileReport()

    world.clock.advance(10)
    report = await reconcile(sched)
    assert report.restarted == [created.id]
    assert (await world.row(created.id)).state == "starting"

    world.clock.advance(settings.start_timeout_s + 5)
    report = await reconcile(sched)
    assert report.failed == [created.id]
    row = await world.row(created.id)
    assert row.state == "failed" and "did not start within" in (row.reason or "")
    assert world.provider.phases[created.id] == "stopped"


async def test_a_young_starting_session_without_compute_is_not_touched(
        world: World, sched: LifecycleScheduler) -> None:
    created = await world.service.create(world.who, schemas.InstanceCreate())
    world.provider.phases.pop(created.id)  # e.g. provider.create still in flight on another replica
    world.clock.advance(30)
    assert await reconcile(sched) == ReconcileReport()
    assert (await world.row(created.id)).state == "starting"


async def test_stuck_stopping_and_deleting_are_finished(world: World, sched: LifecycleScheduler,
                                                        settings: Settings) -> None:
    stopping = await world.new_running()
    deleting = await world.new_running()
    await force_state(world, stopping.id, "stopping", settings.start_timeout_s + 1)
    await force_state(world, deleting.id, "deleting", settings.start_timeout_s + 1)
    report = await reconcile(sched)
    assert sorted(report.finished) == sorted([stopping.id, deleting.id])
    assert (await world.row(stopping.id)).state == "stopped"
    assert world.provider.phases[stopping.id] == "stopped"
    assert (await world.row(deleting.id)).state == "deleted"
    assert deleting.id not in world.provider.phases


async def test_a_stop_whose_actor_died_is_finished_once_its_compute_is_gone(
        world: World, sched: LifecycleScheduler) -> None:
    """Found by the soak: the scheduler killed -9 while it stopped an idle session left the row in
    `stopping` for start_timeout_s (10 minutes) although the runner had exited."""
    gone, live = await world.new_running(), await world.new_running()
    await force_state(world, gone.id, "stopping", 30)
    await force_state(world, live.id, "stopping", 30)
    world.provider.phases[gone.id] = "stopped"  # the runner exited on the SIGTERM it got
    assert (await reconcile(sched)).finished == []  # a live actor may still be finishing it
    world.clock.advance(31)
    assert (await reconcile(sched)).finished == [gone.id]
    assert (await world.row(gone.id)).state == "stopped"
    assert (await world.row(live.id)).state == "stopping"  # compute still running: the usual timeout


async def test_rows_that_changed_after_the_listing_wait_for_the_next_pass(
        world: World, sched: LifecycleScheduler) -> None:
    inst = await world.new_running()
    world.provider.phases.pop(inst.id)
    # state_changed_at == the listing time: judged on the next pass, not this one.
    assert await reconcile(sched) == ReconcileReport()
    world.clock.advance(1)
    assert (await reconcile(sched)).restarted == [inst.id]


async def test_provider_errors_leave_the_rest_of_the_pass_running(world: World, sched: LifecycleScheduler) -> None:
    world.provider.phases["ghost-aaaaaa"] = "running"
    world.provider.phases["ghost-bbbbbb"] = "running"
    world.provider.fail_next = "api server timeout"
    report = await reconcile(sched)
    assert report.errors == ["ghost-aaaaaa"] and report.orphans_stopped == ["ghost-bbbbbb"]
    assert (await reconcile(sched)).orphans_stopped == ["ghost-aaaaaa"]


@both_databases
async def test_an_oom_killed_session_is_told_once_per_kill(world: World, sched: LifecycleScheduler) -> None:
    """The provider restarted a session's compute after the OOM killer ended it: the user reads it in the
    session's events, once per kill, and the session stays running."""
    inst = await world.new_running()
    world.clock.advance(5)
    kill = "the session's runner used more than its memory limit of 4Gi and was killed (OOMKilled) at 15:20"
    world.provider.out_of_memory[inst.id] = kill
    await reconcile(sched)
    await reconcile(sched)
    told = [e for e in await world.events(inst.id) if e.kind == "out_of_memory"]
    assert [e.message for e in told] == [kill]
    assert (await world.row(inst.id)).state == "running"
    world.provider.out_of_memory[inst.id] = kill.replace("15:20", "15:25")
    await reconcile(sched)
    told = [e for e in await world.events(inst.id) if e.kind == "out_of_memory"]
    assert [e.message for e in told] == [kill, kill.replace("15:20", "15:25")]
