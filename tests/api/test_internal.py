"""The runner's heartbeat and the gateway's authorize/attach-event routes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sanic import Sanic
from sqlalchemy import select, update

from api import admin
from api.db.models import Event, Instance, UsedJti
from api.instances.providers.fake import FakeProvider
from tests.conftest import Tenant, both_databases, make_tenant

SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLE runner"


async def new_session(app: Sanic, t: Tenant, provider: FakeProvider) -> tuple[str, dict[str, str]]:
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = resp.json["id"]
    return sid, {"Authorization": f"Bearer {provider.specs[sid].runner_token}"}


async def beat(app: Sanic, sid: str, headers: dict[str, str], **body: object):
    _, resp = await app.asgi_client.post(f"/internal/v1/instances/{sid}/heartbeat", json=body, headers=headers)
    return resp


async def test_first_heartbeat_with_endpoint_moves_to_running(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    resp = await beat(app, sid, runner, init_status="running")
    assert resp.status == 200 and resp.json["state"] == "starting"
    resp = await beat(app, sid, runner, host_key=HOST_KEY, ssh_host="127.0.0.1", ssh_port=40022,
                      init_status="succeeded", program_running=True)
    assert resp.json["state"] == "running"
    _, got = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert got.json["status"] == "running" and got.json["started_at"]


async def test_heartbeat_needs_this_sessions_runner_token(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)
    _other, other_runner = await new_session(app, t, provider)
    assert (await beat(app, sid, other_runner)).status == 401
    assert (await beat(app, sid, t.headers)).status == 401
    assert (await beat(app, sid, {"Authorization": "Bearer orzr_" + "x" * 43})).status == 401


async def test_pane_output_with_nobody_attached_moves_last_activity(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    earlier = datetime.now(UTC) - timedelta(minutes=5)
    await beat(app, sid, runner, last_output_at=earlier.isoformat(), attached_clients=0)
    async with sessions() as db:
        first = (await db.get(Instance, sid)).last_activity_at
    assert abs((first - earlier).total_seconds()) < 1
    later = datetime.now(UTC) - timedelta(seconds=5)
    await beat(app, sid, runner, last_output_at=later.isoformat(), attached_clients=0)
    async with sessions() as db:
        assert (await db.get(Instance, sid)).last_activity_at > first


async def test_fatal_error_fails_the_session_with_the_reason_and_releases_compute(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    reason = ".orz/cloud.yaml:3: setup.bogus: unknown key"
    resp = await beat(app, sid, runner, fatal_error=reason)
    assert resp.json["state"] == "failed"
    # Compute is released right after the reply (the runner is the caller and exits by itself).
    await app.ctx.state.instances.wait_background()
    assert provider.phases[sid] == "stopped"
    _, got = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert got.json["reason"] == reason


async def authorize(app: Sanic, **body: object):
    _, resp = await app.asgi_client.post("/internal/v1/authorize", json=body, headers=SERVICE)
    return resp


async def test_authorize_returns_route_for_owner_of_running_session(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate")
    assert resp.status == 200 and resp.json["route"] is None and resp.json["state"] == "starting"
    await beat(app, sid, runner, host_key=HOST_KEY, ssh_host="10.0.0.5", ssh_port=2222, init_status="none")
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate", readonly=True)
    assert resp.json["route"] == {"host": "10.0.0.5", "port": 2222, "host_key": HOST_KEY}
    assert resp.json["mode"] == "ro"


async def test_authorize_refusals_are_clear_and_leak_nothing(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    mallory = await make_tenant(sessions, "evil")
    sid, _ = await new_session(app, t, provider)
    resp = await authorize(app, session_id=sid, user_id=mallory.user_id, method="certificate")
    assert resp.status == 404 and resp.json["detail"] == f"no such session: {sid}"
    resp = await authorize(app, session_id="nope-123456", user_id=t.user_id, method="certificate")
    assert resp.status == 404
    await admin.set_user_active(sessions, t.email, False)
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate")
    assert resp.status == 403 and resp.json["detail"] == "your account is disabled"
    _, resp = await app.asgi_client.post(
        "/internal/v1/authorize", json={"session_id": sid, "user_id": t.user_id, "method": "jwt"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert resp.status == 401


async def test_a_teammate_may_not_attach_but_an_org_admin_may(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    teammate = await admin.create_user(sessions, "bob@acme.example", "acme")
    org_admin = await admin.create_user(sessions, "root@acme.example", "acme", role="admin")
    sid, _ = await new_session(app, t, provider)
    exp = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
    resp = await authorize(app, session_id=sid, user_id=teammate.id, method="jwt", jti="bobs-jti",
                           jti_expires_at=exp)
    assert resp.status == 403 and resp.json["detail"] == f"session {sid} belongs to someone else in your org"
    # The refusal came before the token was spent: its jti is still unused.
    async with sessions() as db:
        assert await db.get(UsedJti, "bobs-jti") is None
    resp = await authorize(app, session_id=sid, user_id=org_admin.id, method="certificate")
    assert resp.status == 200 and resp.json["user_id"] == org_admin.id


async def test_jwt_ids_are_single_use(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)
    exp = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
    body = {"session_id": sid, "user_id": t.user_id, "method": "jwt", "jti": "abc123", "jti_expires_at": exp}
    assert (await authorize(app, **body)).status == 200
    again = await authorize(app, **body)
    assert again.status == 401 and "already used" in again.json["detail"]


async def test_attaching_to_a_stopped_session_wakes_it(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)
    await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate", wake=False)
    assert resp.status == 409 and "is stopped" in resp.json["detail"]
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate")
    assert resp.status == 200 and resp.json["state"] == "starting"
    assert provider.phases[sid] == "running"
    async with sessions() as db:
        kinds = [e.kind for e in await db.scalars(select(Event).where(Event.instance_id == sid))]
    assert "woke" in kinds


async def test_attach_events_are_recorded(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)
    _, resp = await app.asgi_client.post("/internal/v1/attach-events", headers=SERVICE, json={
        "session_id": sid, "user_id": t.user_id, "event": "detached", "connection_id": "c1",
        "source_address": "203.0.113.9", "bytes_in": 10, "bytes_out": 2000, "duration_s": 12.5})
    assert resp.status == 204
    _, status = await app.asgi_client.get(f"/v1/instances/{sid}/status", headers=t.headers)
    last = status.json["events"][-1]
    assert last["kind"] == "detached" and "203.0.113.9" in last["message"]


async def test_a_spent_jti_is_kept_until_its_token_would_expire(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)
    exp = (datetime.now(UTC) + timedelta(minutes=2)).replace(microsecond=0)
    body = {"session_id": sid, "user_id": t.user_id, "method": "jwt", "jti": "j-exp", "jti_expires_at": exp.isoformat()}
    assert (await authorize(app, **body)).status == 200
    no_exp = {"session_id": sid, "user_id": t.user_id, "method": "jwt", "jti": "j-no-exp"}
    assert (await authorize(app, **no_exp)).status == 200
    async with sessions() as db:
        assert (await db.get(UsedJti, "j-exp")).expires_at == exp  # the purge deletes it after this
        kept = (await db.get(UsedJti, "j-no-exp")).expires_at
    assert abs((kept - datetime.now(UTC)).total_seconds()) < 30


async def test_route_only_for_an_attachable_session_with_its_whole_endpoint(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    # The endpoint is reported but init still runs: starting, so no route yet.
    await beat(app, sid, runner, host_key=HOST_KEY, ssh_host="10.0.0.5", ssh_port=2222, init_status="running")
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate")
    assert resp.json["state"] == "starting" and resp.json["route"] is None
    assert resp.json["message"] == f"session {sid} is starting"
    for missing in ("route_host", "route_port", "runner_host_key"):
        async with sessions() as db:
            endpoint = {"route_host": "10.0.0.5", "route_port": 2222, "runner_host_key": HOST_KEY, missing: None}
            await db.execute(update(Instance).where(Instance.id == sid).values(state="running", **endpoint))
            await db.commit()
        resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate")
        assert resp.json["state"] == "running" and resp.json["route"] is None, missing


async def test_a_failed_session_without_a_reason_says_so(app, sessions, provider):
    t = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, t, provider)
    async with sessions() as db:
        await db.execute(update(Instance).where(Instance.id == sid).values(state="failed", reason=None))
        await db.commit()
    resp = await authorize(app, session_id=sid, user_id=t.user_id, method="certificate")
    assert resp.status == 409 and resp.json["detail"] == f"session {sid} failed: unknown reason"


async def test_waking_uses_the_orgs_plan_and_names_who_woke_it(app, sessions, provider):
    t = await make_tenant(sessions, "acme", plan="pro")  # pro: 5 active; free would allow only 2
    sids = [(await new_session(app, t, provider))[0] for _ in range(3)]
    await app.asgi_client.post(f"/v1/instances/{sids[0]}/stop", headers=t.headers)
    resp = await authorize(app, session_id=sids[0], user_id=t.user_id, method="certificate")
    assert resp.status == 200 and resp.json["state"] == "starting"
    async with sessions() as db:
        woke = (await db.scalars(select(Event).where(Event.instance_id == sids[0], Event.kind == "woke"))).one()
    assert woke.actor == f"user:{t.user_id}"


@both_databases
async def test_a_runners_number_too_large_for_the_database_is_refused_not_a_500(app, sessions, provider):
    """PostgreSQL's INTEGER is 32-bit: an exit code or client count beyond it (a hostile runner's) was a 500
    there, after the request was taken as valid."""
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    for body in ({"attached_clients": 2**40}, {"program_exit_code": 2**31}, {"agent_state": "exited",
                 "agent_exit_code": -(2**40)},
                 {"program_events": [{"kind": "program_exited", "exit_code": 2**40, "message": "x"}]}):
        resp = await beat(app, sid, runner, **body)
        assert resp.status == 422 and resp.headers["content-type"] == "application/problem+json", (body, resp.text)
    ok = await beat(app, sid, runner, agent_state="exited", agent_exit_code=-(2**31), attached_clients=2**31 - 1)
    assert ok.status == 200
