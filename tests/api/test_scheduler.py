"""One scheduler at a time: the database lease, two replicas on one database, APScheduler wiring."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db.base import utcnow
from api.db.models import Event, SchedulerLease, UsedJti
from api.instances.providers.fake import FakeProvider
from api.instances.service import InstanceService
from api.jobs import lease as lease_mod
from api.jobs import scheduler as scheduler_mod
from api.jobs.lease import Lease, LeaseLost
from api.jobs.purge import PurgeReport
from api.jobs.reap_idle import ReapReport
from api.jobs.scheduler import LifecycleScheduler, running_scheduler
from api.settings import Settings
from tests.api.lifecycle_support import FakeClock, World, principal
from tests.conftest import both_databases

LEASE_S = 30


def lease(sessions: async_sessionmaker[AsyncSession], clock: FakeClock, holder: str) -> Lease:
    return Lease(sessions, name="lifecycle", duration_s=LEASE_S, holder=holder, clock=clock)


@both_databases
async def test_lease_is_exclusive_until_it_expires(sessions: async_sessionmaker[AsyncSession]) -> None:
    clock = FakeClock()
    a, b = lease(sessions, clock, "a"), lease(sessions, clock, "b")
    assert await a.acquire() and a.held()
    assert not await b.acquire() and not b.held()
    clock.advance(LEASE_S - 1)
    assert await a.acquire()  # renewed: good for another full period
    clock.advance(LEASE_S - 1)
    assert not await b.acquire()
    clock.advance(2)  # a stopped renewing (crashed): the lease runs out
    assert not a.held()
    assert await b.acquire() and b.held()
    assert not await a.acquire()
    await b.release()
    assert not b.held()
    assert await a.acquire()  # a clean release hands over at once


@both_databases
async def test_concurrent_acquirers_get_one_winner(sessions: async_sessionmaker[AsyncSession]) -> None:
    clock = FakeClock()
    for _round in range(3):
        contenders = [lease(sessions, clock, f"r{_round}-{i}") for i in range(6)]
        results = await asyncio.gather(*(c.acquire() for c in contenders))
        assert sum(results) == 1, results
        clock.advance(LEASE_S + 1)  # expire it so the next round races again over an existing row
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(SchedulerLease)) == 1


async def two_replicas(settings: Settings, sessions: async_sessionmaker[AsyncSession]
                       ) -> tuple[World, LifecycleScheduler, LifecycleScheduler]:
    clock, provider = FakeClock(), FakeProvider()
    world = World(await principal(sessions, "acme"), InstanceService(settings, sessions, provider, clock=clock),
                  provider, clock)
    a = LifecycleScheduler(settings, sessions, provider, clock=clock, holder="replica-a")
    b = LifecycleScheduler(settings, sessions, provider, clock=clock, holder="replica-b")
    return world, a, b


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_two_schedulers_on_one_postgres_reap_once(settings: Settings,
                                                        sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = settings.model_copy(update={"scheduler_lease_s": LEASE_S})
    world, a, b = await two_replicas(settings, sessions)
    idle = [await world.new_running() for _ in range(3)]
    for _ in range(47):  # 31 minutes of silence, heartbeats keep coming
        world.clock.advance(40)
        for inst in idle:
            await world.heartbeat(inst.id)

    results = await asyncio.gather(a.run_job("reap"), b.run_job("reap"), a.run_job("reap"), b.run_job("reap"))
    reports = [r for r in results if r is not None]
    assert all(isinstance(r, ReapReport) for r in reports)
    assert sorted(sid for r in reports for sid in r.stopped) == sorted(i.id for i in idle)
    assert (a.runs["reap"] == 0) != (b.runs["reap"] == 0), "exactly one replica acts"
    async with sessions() as db:
        stops = await db.scalar(select(func.count()).select_from(Event).where(Event.kind == "stopping"))
    assert stops == len(idle)
    assert [c for c in world.provider.calls if c[0] == "stop"] == [("stop", i.id) for i in sorted(
        idle, key=lambda i: i.id)]


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_killed_leader_hands_over_within_one_lease_period(
        settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    settings = settings.model_copy(update={"scheduler_lease_s": LEASE_S})
    world, a, b = await two_replicas(settings, sessions)
    assert await a.run_job("purge") is not None
    assert await b.run_job("purge") is None
    killed_at = world.clock()
    await a.stop(release=False)  # a crash: the lease row still names a
    assert await a.run_job("purge") is None
    world.clock.advance(LEASE_S - 1)
    assert await b.run_job("purge") is None, "the lease is still a's"
    world.clock.advance(1)
    assert isinstance(await b.run_job("purge"), PurgeReport)
    assert b.is_leader() and world.clock() - killed_at <= timedelta(seconds=LEASE_S)


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_real_schedulers_hand_over_in_real_time(settings: Settings,
                                                      sessions: async_sessionmaker[AsyncSession]) -> None:
    """Two APScheduler-driven replicas with the real clock: one leads; killing it hands over in time."""
    lease_s = 2
    settings = settings.model_copy(update={"scheduler_lease_s": lease_s, "reap_interval_s": 1})
    provider = FakeProvider()
    a = LifecycleScheduler(settings, sessions, provider, holder="real-a")
    b = LifecycleScheduler(settings, sessions, provider, holder="real-b")
    a.start()
    await wait_for(a.is_leader, 3)
    b.start()
    try:
        await wait_for(lambda: a.runs["reap"] >= 2, 5)
        assert b.runs["reap"] == 0 and not b.is_leader()
        killed = time.monotonic()
        await a.stop(release=False)
        await wait_for(b.is_leader, lease_s + 2)
        handover = time.monotonic() - killed
        # Within one lease period after a's last renewal (it renewed at most lease_s/3 before the kill).
        assert handover <= lease_s + lease_s / 3 + 0.5, handover
        await wait_for(lambda: b.runs["reap"] >= 1, 3)
        assert a.runs["reap"] >= 2
    finally:
        await a.stop()
        await b.stop()
    async with sessions() as db:
        row = await db.get(SchedulerLease, "lifecycle")
        assert row is not None and row.holder == "real-b" and row.expires_at <= utcnow()  # released on stop


async def wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


async def test_running_scheduler_context_runs_jobs_and_cleans_up(settings: Settings) -> None:
    settings = settings.model_copy(update={"reap_interval_s": 1, "scheduler_lease_s": 2})
    provider = FakeProvider()
    async with running_scheduler(settings, provider=provider) as sched:
        assert isinstance(sched, LifecycleScheduler)
        await wait_for(lambda: sched.runs["reap"] >= 1 and sched.runs["reconcile"] >= 1, 5)
        aps = sched._aps
        assert aps is not None and aps.running
    assert not aps.running
    assert not sched.is_leader()
    assert await sched.run_job("reap") is None  # stopped schedulers do nothing


async def test_running_scheduler_respects_run_scheduler_off(settings: Settings) -> None:
    async with running_scheduler(settings.model_copy(update={"run_scheduler": False})) as sched:
        assert sched is None


async def test_run_until_stop(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings.model_copy(update={"reap_interval_s": 1, "scheduler_lease_s": 2})
    started: list[LifecycleScheduler] = []
    original_start = LifecycleScheduler.start

    def spy(self: LifecycleScheduler) -> None:
        started.append(self)
        original_start(self)

    monkeypatch.setattr(LifecycleScheduler, "start", spy)
    stop = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(scheduler_mod.run(settings, stop, provider=FakeProvider()))
    await wait_for(lambda: bool(started) and started[0].runs["reap"] >= 1, 5)
    stop.set_result(None)
    await asyncio.wait_for(runner, 5)
    assert not started[0].is_leader()


async def test_purge_removes_spent_jti_past_expiry(settings: Settings,
                                                   sessions: async_sessionmaker[AsyncSession]) -> None:
    clock = FakeClock()
    async with sessions() as db:
        db.add_all([
            UsedJti(jti="old", expires_at=clock() - timedelta(hours=1)),
            UsedJti(jti="recent", expires_at=clock() - timedelta(minutes=1)),  # inside the leeway
            UsedJti(jti="live", expires_at=clock() + timedelta(minutes=2)),
        ])
        await db.commit()
    sched = LifecycleScheduler(settings, sessions, FakeProvider(), clock=clock)
    report = await sched.run_job("purge")
    assert report == PurgeReport(jtis=1)
    async with sessions() as db:
        assert sorted(await db.scalars(select(UsedJti.jti))) == ["live", "recent"]


async def test_a_failing_job_is_logged_and_the_next_tick_runs(settings: Settings,
                                                              sessions: async_sessionmaker[AsyncSession],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    sched = LifecycleScheduler(settings, sessions, FakeProvider(), clock=FakeClock())

    async def boom(_keep_going: object) -> None:
        raise RuntimeError("provider list exploded")

    real = sched.jobs["reconcile"]
    sched.jobs["reconcile"] = boom  # type: ignore[assignment]
    assert await sched.run_job("reconcile") is None
    assert "scheduler job reconcile failed" in caplog.text
    sched.jobs["reconcile"] = real
    assert await sched.run_job("reconcile") is not None


async def test_standby_replica_does_nothing(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    clock = FakeClock()
    leader = lease(sessions, clock, "someone-else")
    assert await leader.acquire()
    provider = FakeProvider()
    provider.phases["ghost-zzzzzz"] = "running"
    sched = LifecycleScheduler(settings, sessions, provider, clock=clock)
    assert await sched.run_job("reconcile") is None
    assert provider.phases == {"ghost-zzzzzz": "running"}


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_a_replica_whose_clock_runs_ahead_cannot_take_a_live_lease(
        sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease runs on the database's clock: a replica 20 s ahead waits for the real expiry like anyone."""
    duration_s = 2
    a = Lease(sessions, name="lifecycle", duration_s=duration_s, holder="a")
    b = Lease(sessions, name="lifecycle", duration_s=duration_s, holder="b")
    assert await a.acquire()
    real_utcnow = lease_mod.utcnow
    # b's machine is 20 s ahead of everyone else's.
    monkeypatch.setattr(lease_mod, "utcnow", lambda: real_utcnow() + timedelta(seconds=20))
    assert not await b.acquire(), "b took a lease that had not expired by the database's clock"
    assert a.held() and not b.held()
    await asyncio.sleep(duration_s + 0.3)  # a stopped renewing
    assert not a.held(), "a must stop acting once its lease may have run out"
    assert await b.acquire() and b.held()


@both_databases
async def test_a_deposed_leaders_writes_are_fenced(settings: Settings,
                                                   sessions: async_sessionmaker[AsyncSession]) -> None:
    """A leader that lost the lease (paused, partitioned) cannot change a session when it wakes up."""
    clock, provider = FakeClock(), FakeProvider()
    world = World(await principal(sessions, "acme"), InstanceService(settings, sessions, provider, clock=clock),
                  provider, clock)
    inst = await world.new_running()
    old = LifecycleScheduler(settings, sessions, provider, clock=clock, holder="old-leader")
    new = LifecycleScheduler(settings, sessions, provider, clock=clock, holder="new-leader")
    assert await old.tick() and old.lease.generation == 1
    # old pauses past its lease; new takes over; old resumes believing its stale view (a GC pause, a
    # partition: it has not looked at the lease since).
    clock.advance(settings.scheduler_lease_s + 1)
    assert await new.tick() and new.lease.generation == 2
    clock.advance(-settings.scheduler_lease_s)  # as old sees it: still inside its own lease
    assert old.lease.held()
    with pytest.raises(LeaseLost):
        await old.service.stop_instance(inst, "scheduler", "idle")
    assert (await world.row(inst.id)).state == "running"
    assert [c for c in provider.calls if c[0] == "stop"] == []
    # Fenced once, it knows: it stands by instead of acting on.
    assert not old.lease.held() and await old.run_job("reap") is None
    # The leader's own writes go through, and a replica that regains the lease later gets a new generation.
    await new.service.stop_instance(inst, "scheduler", "idle")
    assert (await world.row(inst.id)).state in ("stopping", "stopped")
    clock.advance(2 * settings.scheduler_lease_s)
    assert await old.tick() and old.lease.generation == 3


def test_the_default_lease_hands_over_a_killed_leader_within_15_s() -> None:
    """Failover after SIGKILL: the lease runs out, then the standby's next tick (every third of it)."""
    lease_s = Settings().scheduler_lease_s
    assert lease_s + max(1.0, lease_s / 3) < 15


async def test_a_scheduler_on_its_own_restarts_a_session_with_its_secrets(
        app, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    """Found by the soak: `orz scheduler` (its own process, as in the chart) could not restart a session
    whose compute vanished when it had secrets ("unknown secret"), so the session stayed failed."""
    from sqlalchemy import update

    from api.db.models import Instance
    from tests.conftest import make_tenant

    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/secrets", json={"name": "soak", "data": {"SOAK_TOKEN": "v-123"}},
                                         headers=t.headers)
    assert resp.status == 201, resp.text
    _, resp = await app.asgi_client.post("/v1/instances", json={"secrets": ["soak"]}, headers=t.headers)
    assert resp.status == 201, resp.text
    sid = resp.json["id"]
    async with sessions() as db:  # it ran for a while, then its compute vanished (a runner killed -9)
        await db.execute(update(Instance).where(Instance.id == sid).values(
            state="running", state_changed_at=utcnow() - timedelta(minutes=5)))
        await db.commit()
    provider = FakeProvider()
    async with scheduler_mod._scheduler(settings, clock=None, provider=provider, secret_env=None) as sched:
        await sched.run_job("reconcile")
        await wait_for(lambda: sid in provider.specs, 5)
        await sched.service.wait_background()
    assert provider.specs[sid].secret_env == {"SOAK_TOKEN": "v-123"}
