"""Roles inside an org: members see and manage only their own sessions, admins all of the org's; audit
events name who acted (issue 17 item 7)."""

from __future__ import annotations

from typing import Any

import pytest
from sanic import Sanic
from sqlalchemy import select

from api import admin, schemas
from api.db.models import Event
from tests.conftest import Tenant, both_databases, make_tenant

SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}


async def colleague(sessions: Any, org: str, email: str, role: str = "member") -> Tenant:
    user = await admin.create_user(sessions, email, org, role=role)
    return Tenant(org=org, email=email, token=await admin.create_token(sessions, email), user_id=user.id)


async def new_session(app: Sanic, t: Tenant) -> str:
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    assert resp.status == 201, resp.text
    return str(resp.json["id"])


@pytest.fixture
async def org(app: Sanic, sessions: Any) -> dict[str, Tenant]:
    alice = await make_tenant(sessions, "acme", plan="team", email="alice@acme.example")
    return {"alice": alice, "bob": await colleague(sessions, "acme", "bob@acme.example"),
            "boss": await colleague(sessions, "acme", "boss@acme.example", role="admin")}


@both_databases
async def test_a_member_cannot_see_or_touch_a_colleagues_session(app: Sanic, org: dict[str, Tenant]) -> None:
    bobs = await new_session(app, org["bob"])
    bob_h, alice_h = org["bob"].headers, org["alice"].headers
    refused = [
        ("get", f"/v1/instances/{bobs}"), ("get", f"/v1/instances/{bobs}/status"),
        ("get", f"/v1/instances/{bobs}/logs"), ("post", f"/v1/instances/{bobs}/stop"),
        ("post", f"/v1/instances/{bobs}/start"), ("post", f"/v1/instances/{bobs}/attach"),
        ("delete", f"/v1/instances/{bobs}"),
    ]
    for method, path in refused:
        _, resp = await app.asgi_client.request(method, path, headers=alice_h)
        assert resp.status == 403, (method, path, resp.status)
        assert resp.headers["content-type"] == "application/problem+json"
        assert "belongs to someone else" in resp.json["detail"]
    _, listed = await app.asgi_client.get("/v1/instances", headers=alice_h)
    assert listed.json["instances"] == []
    assert listed.json["quota"]["active"] == 1  # the org's quota is shared: the count stays the org's
    # Nothing happened to Bob's session, and the gateway refuses Alice too.
    _, mine = await app.asgi_client.get(f"/v1/instances/{bobs}", headers=bob_h)
    assert mine.status == 200 and mine.json["status"] == "starting"
    _, resp = await app.asgi_client.post("/internal/v1/authorize", headers=SERVICE, json={
        "session_id": bobs, "user_id": org["alice"].user_id, "method": "jwt"})
    assert resp.status == 403


@both_databases
async def test_an_admin_sees_and_manages_every_session_of_the_org(app: Sanic, sessions: Any,
                                                                  org: dict[str, Tenant]) -> None:
    bobs, alices = await new_session(app, org["bob"]), await new_session(app, org["alice"])
    boss = org["boss"]
    _, listed = await app.asgi_client.get("/v1/instances", headers=boss.headers)
    assert {i["id"] for i in listed.json["instances"]} == {bobs, alices}
    _, bob_list = await app.asgi_client.get("/v1/instances", headers=org["bob"].headers)
    assert [i["id"] for i in bob_list.json["instances"]] == [bobs]
    for method, path in [("get", f"/v1/instances/{bobs}"), ("get", f"/v1/instances/{bobs}/status"),
                         ("get", f"/v1/instances/{bobs}/logs"), ("post", f"/v1/instances/{bobs}/attach"),
                         ("post", f"/v1/instances/{bobs}/stop"), ("post", f"/v1/instances/{bobs}/start"),
                         ("delete", f"/v1/instances/{bobs}")]:
        _, resp = await app.asgi_client.request(method, path, headers=boss.headers)
        assert resp.status == 200, (method, path, resp.text)
    # Another org's admin is no admin here.
    stranger = await make_tenant(sessions, "globex")
    await admin.set_role(sessions, stranger.email, "admin")
    _, resp = await app.asgi_client.get(f"/v1/instances/{alices}", headers=stranger.headers)
    assert resp.status == 404
    # The audit trail names the admin for what the admin did, and the owner for the create.
    async with sessions() as db:
        events = list(await db.scalars(select(Event).where(Event.instance_id == bobs).order_by(Event.id)))
    by_kind = {e.kind: e for e in events}
    assert by_kind["created"].actor == f"user:{org['bob'].user_id}"
    for kind in ("stopping", "stopped", "starting", "attach_granted", "deleting", "deleted"):
        assert kind in by_kind, [e.kind for e in events]
    for e in events[2:]:
        assert e.actor == f"user:{boss.user_id}", (e.kind, e.actor)
    assert boss.email in (by_kind["attach_granted"].message or "")


@both_databases
async def test_attach_grants_are_audited_with_the_actor(app: Sanic, org: dict[str, Tenant]) -> None:
    sid = await new_session(app, org["alice"])
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=org["alice"].headers,
                                         json={"readonly": True})
    assert resp.status == 200
    _, status = await app.asgi_client.get(f"/v1/instances/{sid}/status", headers=org["alice"].headers)
    grants = [e for e in status.json["events"] if e["kind"] == "attach_granted"]
    assert len(grants) == 1 and grants[0]["actor"] == f"user:{org['alice'].user_id}"
    assert grants[0]["message"] == "token, read-only for alice@acme.example"


async def test_role_changes_reach_me_and_the_list(app: Sanic, sessions: Any, settings, org: dict[str, Tenant]
                                                  ) -> None:
    await new_session(app, org["bob"])
    _, me = await app.asgi_client.get("/v1/me", headers=org["alice"].headers)
    assert me.json["user"]["role"] == "member" and me.json["user"]["is_admin"] is False
    await admin.set_role(sessions, org["alice"].email, "admin")
    app.ctx.state.principals = type(app.ctx.state.principals)(0)  # skip the token cache's few seconds
    _, me = await app.asgi_client.get("/v1/me", headers=org["alice"].headers)
    assert me.json["user"]["role"] == "admin" and me.json["user"]["is_admin"] is True
    _, listed = await app.asgi_client.get("/v1/instances", headers=org["alice"].headers)
    assert len(listed.json["instances"]) == 1


async def test_roles_are_checked(sessions: Any) -> None:
    await admin.create_org(sessions, "acme")
    with pytest.raises(Exception, match="role must be one of member, admin"):
        await admin.create_user(sessions, "x@acme.example", "acme", role="owner")
    await admin.create_user(sessions, "y@acme.example", "acme")
    with pytest.raises(Exception, match="role must be one of"):
        await admin.set_role(sessions, "y@acme.example", "root")
    assert schemas.ROLES == ("member", "admin")


async def test_the_embedded_servers_bootstrap_user_is_an_admin(sessions: Any) -> None:
    boot = await admin.bootstrap(sessions)
    assert boot.user.role == "admin"


def test_admin_cli_creates_users_with_a_role_and_changes_it(database_url: str, tmp_path) -> None:
    import subprocess
    import sys

    env = {"ORZ_DATABASE_URL": database_url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def orz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "admin", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    assert orz("create-org", "acme").returncode == 0
    out = orz("create-user", "lead@acme.example", "--org", "acme", "--role", "admin")
    assert out.returncode == 0 and "created user lead@acme.example (admin)" in out.stdout, out.stderr
    out = orz("create-user", "dev@acme.example", "--org", "acme")
    assert "created user dev@acme.example (member)" in out.stdout, out.stderr
    out = orz("set-role", "dev@acme.example", "admin")
    assert out.returncode == 0 and "dev@acme.example is now admin" in out.stdout, out.stderr
    out = orz("set-role", "dev@acme.example", "owner")
    assert out.returncode != 0 and "owner" in out.stderr
    out = orz("set-role", "nobody@acme.example", "member")
    assert out.returncode != 0 and "no such user" in out.stderr


async def test_the_document_lists_the_403_of_every_session_route(app: Sanic) -> None:
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    for path, item in resp.json["paths"].items():
        if path.startswith("/v1/instances/{id}"):
            for method, op in item.items():
                assert "403" in op["responses"], (method, path)
