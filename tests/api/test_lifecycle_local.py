"""Lifecycle on the local provider: real API, real runner processes (git, tmux), real heartbeats.

The deployment idle timeout is the smallest allowed (ORZ_IDLE_TIMEOUT_S=10), so the reaper acts on what
the runner really reports about its pane, with the real clock.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from api import schemas
from api.app import create_app
from api.auth import Principal
from api.db.models import Event, Instance
from api.errors import SessionFailed
from api.instances.providers.local import LocalProvider, process_start_time
from api.instances.providers.sandbox import HOME_NOTE
from api.instances.service import InstanceService
from api.jobs.reap_idle import ReapReport
from api.jobs.reconcile import ReconcileReport
from api.jobs.scheduler import LifecycleScheduler
from api.serve import ApiServer
from api.settings import Settings
from tests.api.lifecycle_support import principal
from tests.runner import conftest as runner_fixtures
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

short_tmp = runner_fixtures.short_tmp
make_repo = runner_fixtures.make_repo
gateway_key = runner_fixtures.gateway_key

IDLE_S = 10
CONFIG = 'version: "1.0"\nsetup:\n  init: echo ran >> init-runs.txt\n'


@dataclass
class Stack:
    settings: Settings
    provider: LocalProvider
    service: InstanceService
    sched: LifecycleScheduler
    who: Principal

    async def row(self, session_id: str) -> Instance:
        async with self.service.db_sessions() as db:
            inst = await db.get(Instance, session_id)
            assert inst is not None
            return inst

    async def wait_state(self, session_id: str, state: str, timeout: float = 30) -> Instance:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            row = await self.row(session_id)
            if row.state == state and (state != "running" or row.route_host):
                return row
            if loop.time() > deadline:
                raise AssertionError(f"{session_id} is {row.state} ({row.reason}), not {state}:\n"
                                     + await self.provider.read_log(session_id, row.provider_state or {}))
            await asyncio.sleep(0.1)

    async def events(self, session_id: str) -> list[Event]:
        async with self.service.db_sessions() as db:
            return list(await db.scalars(select(Event).where(Event.instance_id == session_id).order_by(Event.id)))


@pytest.fixture
async def stack(request: pytest.FixtureRequest, short_tmp: Path, database_url: str,
                gateway_key: runner_fixtures.GatewayKey) -> AsyncIterator[Stack]:
    # Indirect parametrization picks the sandbox ("on", the default, or "off").
    settings = Settings(
        sandbox=getattr(request, "param", "on"),
        data_dir=short_tmp / "data", database_url=database_url, provider="local", api_port=0,
        heartbeat_interval_s=1, idle_timeout_s=IDLE_S, gateway_public_key=gateway_key.public, log_json=False,
        service_token="svc-test-token-0123456789",  # type: ignore[arg-type]
    )
    provider = LocalProvider(settings)
    app = create_app(settings, provider=provider)
    server = await ApiServer.start(app, "127.0.0.1", 0)
    # The users' URL answers nothing here: runners must heartbeat on the internal one.
    settings = settings.model_copy(update={"api_port": server.port,
                                           "public_api_url": f"http://127.0.0.1:{free_port()}",
                                           "internal_api_url": f"http://127.0.0.1:{server.port}"})
    state = app.ctx.state
    state.settings = settings
    state.instances.settings = settings
    # The scheduler is another replica: its own service, the same database and compute.
    sched = LifecycleScheduler(settings, state.sessions, provider, gateway_public_key=gateway_key.public)
    try:
        yield Stack(settings, provider, state.instances, sched, await principal(state.sessions, "acme"))
    finally:
        await sched.stop()
        for sid in await provider.list():
            await provider.stop(sid, {})
        await server.stop()
        await provider.close()


async def test_reaper_stops_then_wake_finds_the_workspace_and_skips_init(stack: Stack, make_repo) -> None:
    repo = make_repo({".orz/cloud.yaml": CONFIG, "README": "hello\n"})
    created = await stack.service.create(stack.who, schemas.InstanceCreate(
        repo_url=repo, branch="main", program=runner_fixtures.HI_PROGRAM))
    first = await stack.wait_state(created.id, "running")
    workspace = stack.provider.session_dir(created.id) / "workspace"
    assert (workspace / "init-runs.txt").read_text() == "ran\n"
    (workspace / "notes.txt").write_text("written before the stop\n")

    # Nobody attaches, types or prints anything ("hi" was the program's last output): the reaper stops it
    # once the idle timeout has passed, and not before.
    loop = asyncio.get_running_loop()
    running_since = loop.time()
    while True:
        report = await stack.sched.run_job("reap")
        assert isinstance(report, ReapReport) and report.unhealthy == []
        if report.stopped:
            break
        assert loop.time() - running_since < IDLE_S + 10, "never reaped: activity keeps being reported"
        await asyncio.sleep(0.5)
    assert report.stopped == [created.id]
    stopped = await stack.row(created.id)
    assert (stopped.state, stopped.reason) == ("stopped", "idle")
    assert stopped.stopped_at is not None and stopped.started_at is not None
    last_active = max(t for t in (stopped.last_activity_at, stopped.started_at) if t is not None)
    assert stopped.stopped_at - last_active >= timedelta(seconds=IDLE_S)
    assert process_start_time(first.provider_state["pid"]) is None  # compute released
    assert workspace.is_dir()

    # Wake on connect: the gateway's authorize call starts it again.
    reply = await stack.service.authorize(schemas.AuthorizeRequest(
        session_id=created.id, user_id=stack.who.user_id, method="certificate", wake=True))
    assert reply.state == "starting" and reply.route is None
    woken = await stack.wait_state(created.id, "running")
    assert woken.provider_state["pid"] != first.provider_state["pid"]
    assert (workspace / "notes.txt").read_text() == "written before the stop\n"
    assert (workspace / "init-runs.txt").read_text() == "ran\n", "init ran again"
    reply = await stack.service.authorize(schemas.AuthorizeRequest(
        session_id=created.id, user_id=stack.who.user_id, method="certificate"))
    assert reply.route is not None and reply.route.port == woken.route_port
    kinds = [(e.actor, e.kind) for e in await stack.events(created.id)]
    assert ("scheduler", "stopped") in kinds and (f"user:{stack.who.user_id}", "woke") in kinds


async def test_a_killed_runner_is_marked_within_one_reconcile_pass(stack: Stack, make_repo) -> None:
    repo = make_repo({".orz/cloud.yaml": CONFIG})
    created = await stack.service.create(stack.who, schemas.InstanceCreate(
        repo_url=repo, branch="main", program=runner_fixtures.HI_PROGRAM))
    running = await stack.wait_state(created.id, "running")
    workspace = stack.provider.session_dir(created.id) / "workspace"
    (workspace / "notes.txt").write_text("still here\n")

    pid = running.provider_state["pid"]
    os.kill(pid, signal.SIGKILL)  # behind the API's back
    for _ in range(100):
        if process_start_time(pid) is None:
            break
        await asyncio.sleep(0.05)
    assert (await stack.provider.list())[created.id].phase != "running"

    report = await stack.sched.run_job("reconcile")
    assert isinstance(report, ReconcileReport) and report.restarted == [created.id]
    events = await stack.events(created.id)
    failed = [e for e in events if e.to_state == "failed"]
    assert failed and failed[-1].actor == "scheduler" and "compute vanished" in (failed[-1].message or "")
    assert events[-1].kind == "retrying"

    restarted = await stack.wait_state(created.id, "running")
    assert restarted.provider_state["pid"] != pid
    assert (workspace / "notes.txt").read_text() == "still here\n"
    assert (workspace / "init-runs.txt").read_text() == "ran\n"


async def test_a_stored_spec_no_runner_accepts_fails_the_start_with_its_reason(stack: Stack) -> None:
    """Old data the API now refuses (a NUL in the task, written before the rule): starting the session
    fails it at once with the reason and frees its quota, instead of a runner dying without a word."""
    created = await stack.service.create(stack.who, schemas.InstanceCreate(program=runner_fixtures.HI_PROGRAM))
    await stack.wait_state(created.id, "running")
    await stack.service.stop(stack.who, created.id)
    async with stack.service.db_sessions() as db:  # SQLite stores what PostgreSQL would refuse
        await db.execute(update(Instance).where(Instance.id == created.id).values(task="fix\x00this"))
        await db.commit()
    with pytest.raises(SessionFailed, match=r"task: contains U\+0000"):
        await stack.service.start(stack.who, created.id)
    failed = await stack.row(created.id)
    assert failed.state == "failed"
    assert (failed.reason or "").startswith("the session's stored spec is not valid: task: contains U+0000")
    assert (await stack.service.quota(stack.who.org_id, stack.who.plan)).active == 0


async def test_a_commit_in_a_session_is_by_its_owner(stack: Stack, make_repo) -> None:
    # The sandboxed session's HOME has no git identity: without the owner's, git refuses to commit
    # ("Author identity unknown ... unable to auto-detect email address").
    program = ("bash -c 'echo x > by-agent.txt && git add by-agent.txt && git commit -qm by-agent 2>&1; "
               "git log -1 --format=\"%an <%ae> / %cn <%ce>\" > .git/who.txt; sleep infinity'")
    created = await stack.service.create(stack.who, schemas.InstanceCreate(
        repo_url=make_repo({"README": "hello\n"}), branch="main", program=program))
    await stack.wait_state(created.id, "running")
    who = stack.provider.session_dir(created.id) / "workspace" / ".git" / "who.txt"
    for _ in range(100):
        if who.exists() and who.read_text().strip():
            break
        await asyncio.sleep(0.1)
    name = stack.who.email.split("@", 1)[0]  # no sign-in login: the email's local part
    assert who.read_text().strip() == f"{name} <{stack.who.email}> / {name} <{stack.who.email}>"


async def test_a_sandboxed_sessions_home_says_what_the_sandbox_refuses(stack: Stack) -> None:
    created = await stack.service.create(stack.who, schemas.InstanceCreate(program=runner_fixtures.HI_PROGRAM))
    await stack.wait_state(created.id, "running")
    note = stack.provider.session_dir(created.id) / "home" / HOME_NOTE
    assert "ORZ_SANDBOX_EGRESS_ALLOW" in note.read_text()
