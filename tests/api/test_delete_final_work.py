"""The two-phase delete with the fake provider playing the runner: a delete without force stops a live session
and decides on the runner's final work report (the local-provider test runs a real runner)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sanic import Sanic

from api import schemas
from api.instances.providers.fake import FakeProvider
from api.settings import Settings
from tests.api.test_internal import HOST_KEY, beat, new_session
from tests.conftest import make_tenant

ROUTE = {"host_key": HOST_KEY, "ssh_host": "127.0.0.1", "ssh_port": 40022, "init_status": "succeeded"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"delete_work_wait_s": 1.5})


@pytest.fixture
def provider() -> FakeProvider:
    fake = FakeProvider()
    fake.reports_final_work = True  # the tests send the final report the runner would
    fake.runner_stop_grace_s = 30.0  # as a Pod's runner lives on after its stop
    return fake


async def running(app: Sanic, sessions, provider: FakeProvider):  # type: ignore[no-untyped-def]
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    resp = await beat(app, sid, runner, **ROUTE, work={"dirty_files": 0})  # the last periodic scan: clean
    assert resp.json["state"] == "running"
    return t, sid, runner


async def final_report_once_stopping(app: Sanic, sid: str, runner: dict[str, str], work: dict[str, object]) -> None:
    """What the runner does on SIGTERM: scan, push where it can, report the final state."""
    while ("stop", sid) not in app.ctx.state.instances.provider.calls:
        await asyncio.sleep(0.01)
    # Straight to the service: the test client serves one request at a time, and the DELETE is in flight.
    token = runner["Authorization"].removeprefix("Bearer ")
    await app.ctx.state.instances.record_heartbeat(sid, token, schemas.Heartbeat(
        init_status="succeeded", work=schemas.WorkState.model_validate({**work, "final": True})))


async def test_a_file_the_last_scan_missed_refuses_the_delete_and_is_listed(app, sessions, provider):
    t, sid, runner = await running(app, sessions, provider)
    late = {"dirty_files": 1, "files": ["late.txt"], "wip_error": "remote: read-only"}
    reporter = asyncio.create_task(final_report_once_stopping(app, sid, runner, late))
    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    await reporter
    assert resp.status == 409 and resp.json["code"] == "unsaved_work", resp.json
    assert resp.json["work"]["files"] == ["late.txt"]
    assert resp.json["detail"].startswith(f"session {sid} has unsaved work: 1 uncommitted file (late.txt), "
                                          "0 unpushed commits; not saved: remote: read-only; it was stopped")
    _, got = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert got.json["status"] == "stopped"  # the workspace is kept
    assert ("delete", sid) not in provider.calls


async def test_a_final_report_with_the_work_saved_lets_the_delete_through(app, sessions, provider):
    t, sid, runner = await running(app, sessions, provider)
    saved = {"dirty_files": 1, "files": ["late.txt"], "wip_branch": f"orz/{sid}", "wip_commit": "a" * 40}
    reporter = asyncio.create_task(final_report_once_stopping(app, sid, runner, saved))
    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    await reporter
    assert resp.status == 200 and resp.json["status"] == "deleted", resp.json
    assert ("delete", sid) in provider.calls


async def test_no_final_report_refuses_the_delete_unless_forced(app, sessions, provider):
    t, sid, _ = await running(app, sessions, provider)
    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.status == 409 and resp.json["code"] == "work_unknown", resp.json
    assert "did not report its workspace's final state within 1.5 s" in resp.json["detail"]
    assert "?force=true" in resp.json["detail"] and resp.json["current_state"] == "stopped"
    assert ("delete", sid) not in provider.calls
    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}?force=true", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "deleted"


async def test_a_starting_session_whose_runner_never_came_up_is_deleted_at_once(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)  # no heartbeat: no endpoint, no init, no program ran
    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "deleted"
    assert ("stop", sid) not in provider.calls or ("delete", sid) in provider.calls


async def test_a_stopped_runners_final_report_is_taken_and_nothing_else(app, sessions, provider):
    t, sid, runner = await running(app, sessions, provider)
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    assert resp.json["status"] == "stopped"
    # Kubernetes: the row is stopped as the Pod is deleted; the runner reports afterwards with its retired token.
    assert (await beat(app, sid, runner, init_status="succeeded")).status == 401
    assert (await beat(app, sid, runner, init_status="succeeded", work={"dirty_files": 2})).status == 401
    resp = await beat(app, sid, runner, **ROUTE, work={"dirty_files": 2, "files": ["a", "b"], "final": True})
    assert resp.status == 200 and resp.json["state"] == "stopped"
    _, got = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert got.json["status"] == "stopped" and got.json["work"]["files"] == ["a", "b"]
    assert got.json.get("ssh_port") is None or got.json["ssh_port"] != 40022  # no route taken from it
    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.status == 409 and resp.json["code"] == "unsaved_work"


async def test_a_failed_push_is_one_event_in_the_sessions_status(app, sessions, provider):
    """The push to orz/<id> failing on a stop was only in the runner's log: `orz cloud status` shows it."""
    t, sid, runner = await running(app, sessions, provider)
    # Through the heartbeat route, as the runner sends it (a call straight to the service between test-client
    # requests left a database connection open past the app's shutdown).
    final = {"dirty_files": 1, "files": ["a.txt"], "final": True, "scanned_at": datetime.now(UTC).isoformat(),
             "wip_error": "remote: Permission to acme/app.git denied; fatal: unable to access"}
    for _ in range(2):  # the same last word, sent again, is one event
        resp = await beat(app, sid, runner, init_status="succeeded", work=final)
        assert resp.status == 200, resp.json
    _, resp = await app.asgi_client.get(f"/v1/instances/{sid}/status", headers=t.headers)
    failed = [e for e in resp.json["events"] if e["kind"] == "work_not_pushed"]
    assert [e["message"] for e in failed] == [
        f"could not push the session's work to orz/{sid}: remote: Permission to acme/app.git denied; "
        "fatal: unable to access"]
