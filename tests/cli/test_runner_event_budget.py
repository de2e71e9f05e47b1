"""A hostile runner against the real API over HTTP: its runner token (which the session's own code can
read) lets it add events to the database every tenant shares, but only as many as its budget."""

from __future__ import annotations

import httpx
from sqlalchemy import select

from api.db.models import Event, Instance
from tests.cli.conftest import LiveApi


def test_a_runner_flooding_events_fills_no_more_than_its_budget(live_api: LiveApi) -> None:
    """300 heartbeats of 16 program events and an agent change each wrote 5,000 rows (6 MB) in 9 s from a
    session Pod of the rehearsal. Now the runner's budget is what it gets; the session still shows the
    agent's latest state, and its owner reads why events are missing."""
    t = live_api.tenant("acme")
    budget = live_api.app.ctx.state.settings.runner_events_per_min
    with httpx.Client(base_url=live_api.url, timeout=30) as http:
        sid = http.post("/v1/instances", json={}, headers=t.headers).json()["id"]
        runner = {"Authorization": f"Bearer {live_api.provider.specs[sid].runner_token}"}
        flood = [{"kind": "program_exited", "exit_code": 1, "message": "x" * 1024}] * 16
        for i in range(40):
            resp = http.post(f"/internal/v1/instances/{sid}/heartbeat", headers=runner, json={
                "program_events": flood, "agent_state": "working" if i % 2 else "idle", "agent_message": f"step {i}"})
            assert resp.status_code == 200, resp.text
        status = http.get(f"/v1/instances/{sid}/status", headers=t.headers).json()

        async def stored() -> tuple[list[tuple[str, str]], Instance | None]:
            async with live_api.app.ctx.state.sessions() as db:
                rows = (await db.execute(select(Event.actor, Event.kind).where(Event.instance_id == sid))).all()
                return [(a, k) for a, k in rows], await db.get(Instance, sid)

        rows, row = live_api.call(stored())
        by_runner = [kind for actor, kind in rows if actor == "runner"]
        assert 0 < len(by_runner) <= budget, f"{len(by_runner)} runner events stored, budget {budget}"
        assert [kind for _, kind in rows].count("events_dropped") == 1
        assert row is not None and (row.agent_state, row.agent_message) == ("working", "step 39")
        notes = [e["message"] for e in status["events"] if e["kind"] == "events_dropped"]
        assert notes and f"more than {budget} events a minute" in notes[0]

        # Another session's runner has a budget of its own.
        other = http.post("/v1/instances", json={}, headers=t.headers).json()["id"]
        other_runner = {"Authorization": f"Bearer {live_api.provider.specs[other].runner_token}"}
        http.post(f"/internal/v1/instances/{other}/heartbeat", headers=other_runner, json={"agent_state": "working"})
        events = http.get(f"/v1/instances/{other}/status", headers=t.headers).json()["events"]
        assert [e["kind"] for e in events if e["kind"] in ("agent", "events_dropped")] == ["agent"]


def test_a_runners_work_report_carries_no_terminal_controls(live_api: LiveApi) -> None:
    """The workspace report is the session's text too: an OSC 52 (clipboard) or a screen clear in its git
    error reaches whoever reads the session (an org admin's client, the delete refusal) as U+FFFD."""
    t = live_api.tenant("acme")
    with httpx.Client(base_url=live_api.url, timeout=30) as http:
        sid = http.post("/v1/instances", json={}, headers=t.headers).json()["id"]
        runner = {"Authorization": f"Bearer {live_api.provider.specs[sid].runner_token}"}
        resp = http.post(f"/internal/v1/instances/{sid}/heartbeat", headers=runner, json={"work": {
            "dirty_files": 2, "wip_error": "push refused\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J",
            "wip_branch": "orz/x\x1b[31m", "files": ["a\x1b]0;owned\x07.txt", "b.md"]}})
        assert resp.status_code == 200, resp.text
        work = http.get(f"/v1/instances/{sid}", headers=t.headers).json()["work"]
        assert work["wip_error"] == "push refused\ufffd]52;c;cm0gLXJmIH4=\ufffd\ufffd[2J"
        assert work["wip_branch"] == "orz/x\ufffd[31m" and work["dirty_files"] == 2
        assert work["files"] == ["a\ufffd]0;owned\ufffd.txt", "b.md"]
        refusal = http.delete(f"/v1/instances/{sid}", headers=t.headers)
        assert refusal.status_code == 409 and "\x1b" not in refusal.text and "\\u001b" not in refusal.text
