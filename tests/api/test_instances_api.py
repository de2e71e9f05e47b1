"""The instances REST API over HTTP (Sanic ASGI client), with the FakeProvider standing in for compute."""

from __future__ import annotations

import json

from sanic import Sanic
from sqlalchemy import select

from api.db.models import Event, Instance
from api.instances.providers.fake import FakeProvider
from tests.conftest import both_databases, make_tenant

REPO = "https://example.com/acme/widgets.git"


async def create(app: Sanic, headers: dict[str, str], **body: object) -> tuple[int, dict]:
    _, resp = await app.asgi_client.post("/v1/instances", json=body or {"repo_url": REPO}, headers=headers)
    return resp.status, resp.json


@both_databases
async def test_create_returns_session_with_ssh_line_and_attach_url(app, sessions, provider: FakeProvider):
    t = await make_tenant(sessions, "acme")
    status, body = await create(app, t.headers, repo_url=REPO, branch="main", tier="medium", task="fix bug")
    assert status == 201
    sid = body["id"]
    assert sid.startswith("widgets-") and len(sid) <= 32
    assert body["status"] == "starting"
    assert body["ssh"] == f"ssh -p 2222 {sid}@127.0.0.1"
    assert body["attach_url"].startswith(f"http://127.0.0.1:8443/v1/instances/{sid}/attach?token=")
    assert body["created_at"].endswith("Z")
    spec = provider.specs[sid]
    assert (spec.repo_url, spec.branch, spec.tier, spec.task) == (REPO, "main", "medium", "fix bug")
    assert spec.resources == {"cpu": "4", "memory": "8Gi"}
    assert spec.runner_token.startswith("orzr_")

    _, resp = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.status == 200 and resp.json["id"] == sid


async def test_curl_style_body_without_json_content_type_is_accepted(app, sessions, provider: FakeProvider):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post(
        "/v1/instances", content=json.dumps({"repo_url": REPO, "branch": "dev", "tier": "large"}),
        headers={**t.headers, "content-type": "application/x-www-form-urlencoded"},
    )
    # Not just accepted: the body was read (an empty body is a valid create too, with other values).
    assert resp.status == 201, resp.json
    assert (resp.json["repo_url"], resp.json["branch"], resp.json["tier"]) == (REPO, "dev", "large")
    spec = provider.specs[resp.json["id"]]
    assert (spec.repo_url, spec.branch, spec.tier) == (REPO, "dev", "large")


async def test_stop_start_delete_walk_the_lifecycle_and_write_events(app, sessions, provider: FakeProvider):
    t = await make_tenant(sessions, "acme")
    _, body = await create(app, t.headers)
    sid = body["id"]

    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "stopped"
    assert provider.phases[sid] == "stopped"

    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "stopped"  # idempotent

    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/start", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "starting"
    assert provider.phases[sid] == "running"

    _, resp = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "deleted"
    assert sid not in provider.phases

    _, resp = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.status == 404
    _, resp = await app.asgi_client.get("/v1/instances", headers=t.headers)
    assert resp.json["instances"] == []

    async with sessions() as db:
        kinds = [e.kind for e in await db.scalars(select(Event).where(Event.instance_id == sid).order_by(Event.id))]
    assert kinds == ["created", "starting", "stopping", "stopped", "starting", "deleting", "deleted"]


async def test_status_shows_latest_events(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, body = await create(app, t.headers)
    _, resp = await app.asgi_client.get(f"/v1/instances/{body['id']}/status", headers=t.headers)
    assert resp.status == 200
    assert [e["kind"] for e in resp.json["events"]] == ["created", "starting"]
    assert resp.json["events"][1]["to_state"] == "starting"


async def test_start_of_a_running_session_is_a_no_op_and_illegal_moves_are_409(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, body = await create(app, t.headers)
    sid = body["id"]
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/start", headers=t.headers)
    assert resp.status == 200 and resp.json["status"] == "starting"
    await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    assert resp.status == 404


async def test_provider_failure_marks_failed_with_reason_and_frees_quota(app, sessions, provider: FakeProvider):
    t = await make_tenant(sessions, "acme")
    provider.fail_next = "no capacity in zone"
    status, body = await create(app, t.headers)
    assert status == 503
    assert "no capacity in zone" in body["detail"]
    sid = body["instance_id"]
    _, resp = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    assert resp.json["status"] == "failed" and resp.json["reason"] == "no capacity in zone"
    _, resp = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert resp.json["quota"]["active"] == 0


@both_databases
async def test_another_orgs_session_is_404_never_403(app, sessions):
    alice = await make_tenant(sessions, "acme")
    mallory = await make_tenant(sessions, "evil")
    _, body = await create(app, alice.headers)
    sid = body["id"]
    for method, path in [("get", f"/v1/instances/{sid}"), ("delete", f"/v1/instances/{sid}"),
                         ("post", f"/v1/instances/{sid}/stop"), ("post", f"/v1/instances/{sid}/start"),
                         ("get", f"/v1/instances/{sid}/status"), ("get", f"/v1/instances/{sid}/logs")]:
        _, resp = await getattr(app.asgi_client, method)(path, headers=mallory.headers)
        assert resp.status == 404, (method, path, resp.status)
        assert resp.json["detail"] == f"no such session: {sid}"
    _, resp = await app.asgi_client.get("/v1/instances", headers=mallory.headers)
    assert resp.json["instances"] == []
    async with sessions() as db:
        assert (await db.get(Instance, sid)).state == "starting"  # untouched


async def test_an_id_that_is_no_session_id_is_not_echoed(app, sessions):
    """An id that cannot be a session's is not repeated in the message a CLI prints (it was, whole, 5,000
    characters or a newline of it); an id that could be one is still named, so a typo is easy to see."""
    alice = await make_tenant(sessions, "acme")
    long_id = "x" * 5000
    for sid in (long_id, "Bad%20Id%0Aline"):
        for method, path in [("get", f"/v1/instances/{sid}"), ("delete", f"/v1/instances/{sid}"),
                             ("post", f"/v1/instances/{sid}/stop"), ("get", f"/v1/instances/{sid}/logs")]:
            _, resp = await getattr(app.asgi_client, method)(path, headers=alice.headers)
            assert resp.status == 404 and resp.json["detail"].startswith("no such session: that is not a session id")
            assert len(resp.json["detail"]) < 100  # (problem+json's `instance` is the request's path, as asked)
    _, resp = await app.asgi_client.get("/v1/instances/nope-123", headers=alice.headers)
    assert resp.status == 404 and resp.json["detail"] == "no such session: nope-123"


async def test_me_reports_user_org_plan_and_quota(app, sessions):
    t = await make_tenant(sessions, "acme", plan="pro")
    await create(app, t.headers)
    _, resp = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert resp.status == 200
    assert resp.json["user"]["email"] == t.email
    assert resp.json["org"] == {"id": resp.json["org"]["id"], "name": "acme", "plan": "pro",
                                "idle_timeout_s": 30 * 60, "retention_s": 7 * 24 * 3600}
    assert resp.json["quota"] == {"limit": 5, "active": 1, "plan": "pro"}


async def test_a_forced_delete_answers_what_the_docs_say(app, sessions, provider: FakeProvider):
    """The answer comes once compute and workspace are gone: `deleted`, forced or not, as the docs say (they
    said `deleting`, which scripts then polled for)."""
    import re

    from tests.support import ROOT

    t = await make_tenant(sessions, "acme")
    answers = []
    for force in ("", "?force=true"):
        _, sid = await create(app, t.headers)
        _, resp = await app.asgi_client.delete(f"/v1/instances/{sid['id']}{force}", headers=t.headers)
        assert resp.status == 200, resp.text
        answers.append(resp.json["status"])
    assert answers == ["deleted", "deleted"]
    documented = {row: re.findall(r"`status: (\w+)`", row) for row in
                  (ROOT / "docs" / "migrating-from-go.md").read_text().splitlines()
                  if row.startswith("| `DELETE /v1/instances/{id}`")}
    assert [found for found in documented.values()] == [["deleted"]], documented
