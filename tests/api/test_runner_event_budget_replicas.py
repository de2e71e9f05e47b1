"""The runner event budget holds across API replicas: two API processes' worth of apps on one database
give a flooding runner its budget once, not once per replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select

from api.app import create_app
from api.db.models import Event
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from api.settings import Settings
from tests.conftest import both_databases, make_tenant


@pytest.fixture
async def replicas(settings: Settings, provider: FakeProvider) -> AsyncIterator[list[str]]:
    """Two API apps (each its own engine, as two replicas have) on one database and one provider."""
    servers = [await ApiServer.start(create_app(settings, provider=provider), "127.0.0.1", 0) for _ in range(2)]
    try:
        yield [f"http://127.0.0.1:{s.port}" for s in servers]
    finally:
        for s in servers:
            await s.stop()


@both_databases
async def test_a_runner_flooding_two_replicas_gets_one_budget(replicas, settings, sessions, provider) -> None:
    budget = settings.runner_events_per_min
    t = await make_tenant(sessions, "acme")
    flood = [{"kind": "program_exited", "exit_code": 1, "message": "x" * 64}] * 4
    async with httpx.AsyncClient(base_url=replicas[0], timeout=30) as first, \
            httpx.AsyncClient(base_url=replicas[1], timeout=30) as second:
        sid = (await first.post("/v1/instances", json={}, headers=t.headers)).json()["id"]
        runner = {"Authorization": f"Bearer {provider.specs[sid].runner_token}"}

        async def beat(http: httpx.AsyncClient, i: int) -> None:
            resp = await http.post(f"/internal/v1/instances/{sid}/heartbeat", headers=runner, json={
                "program_events": flood, "agent_state": "working" if i % 2 else "idle", "agent_message": f"step {i}"})
            assert resp.status_code == 200, resp.text

        # Turn about, then both at once: each replica alone would let `budget` through.
        for i in range(12):
            await beat((first, second)[i % 2], i)
        await asyncio.gather(*(beat((first, second)[i % 2], i) for i in range(12, 24)))
        status = (await second.get(f"/v1/instances/{sid}/status", headers=t.headers)).json()
    async with sessions() as db:
        rows = (await db.execute(select(Event.actor, Event.kind).where(Event.instance_id == sid))).all()
    by_runner = [kind for actor, kind in rows if actor == "runner" and kind != "running"]
    assert len(by_runner) == budget, f"{len(by_runner)} runner events stored, budget {budget}"
    assert [kind for _, kind in rows].count("events_dropped") == 1
    notes = [e["message"] for e in status["events"] if e["kind"] == "events_dropped"]
    assert notes and f"more than {budget} events a minute" in notes[0]


async def test_the_budget_reads_only_the_sessions_last_minute(settings: Settings, sessions) -> None:
    """Each heartbeat that carries an event asks the budget, as often as the runner (the session's own code)
    likes. Every query it makes must be a search of the session's last minute by (instance_id, kind, at):
    one that reads the session's whole history costs the shared database more with every event kept."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import event

    from api.instances.event_budget import EventBudget

    now = datetime.now(UTC)
    async with sessions() as db:
        # A full minute, so the budget also asks about this spell's note.
        db.add_all(Event(instance_id="s1", org_id="o", at=now - timedelta(seconds=i), actor="runner",
                         kind="program_exited") for i in range(3))
        await db.commit()
    statements: list[tuple[str, object]] = []
    async with sessions() as db:
        engine = db.bind.sync_engine  # type: ignore[union-attr]

        def keep(_conn, _cursor, statement, parameters, _context, _many) -> None:  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith("SELECT"):
                statements.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", keep)
        try:
            budget = await EventBudget.load(db, "s1", 3, now)
        finally:
            event.remove(engine, "before_cursor_execute", keep)
        assert budget.left == 0 and budget.take() is False  # the spell's first refusal writes the note
        assert len(statements) == 3, statements
        conn = await db.connection()
        for statement, parameters in statements:
            plan = " ".join(str(row[-1]) for row in await conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement, parameters))  # type: ignore[arg-type]
            assert "INDEX ix_events_instance_kind_at (instance_id=? AND kind=? AND at>?)" in plan, (statement, plan)
