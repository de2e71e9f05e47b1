"""The gateway tests' API stand-in (standins.FakeApi) answers like the real API, case by case.

The same authorize and attach-event requests, in the same order, go to the real API (create_app on
SQLite) and to the stand-in set up with the same users, orgs and sessions; status, problem code, detail
and reply must be equal. A rule changed in api/instances/gateway_side.py fails here until the stand-in
follows it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sanic import Sanic

from api import admin
from api.instances.providers.fake import FakeProvider
from tests.api.test_internal import HOST_KEY, beat, new_session
from tests.conftest import make_tenant
from tests.gateway.standins import FakeApi, FakeSession

SERVICE_TOKEN = "svc-test-token-0123456789"  # the settings fixture's
JTI_EXP = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()

Answer = tuple[int, Any]


def _normal(status: int, body: Any) -> Answer:
    if body is None:
        return status, None
    if status >= 400:
        return status, (body.get("code"), body.get("detail"))
    return status, {k: body.get(k) for k in ("session_id", "user_id", "state", "mode", "route", "message")}


async def _real(app: Sanic, path: str, body: dict[str, Any], headers: dict[str, str]) -> Answer:
    _, resp = await app.asgi_client.post(path, json=body, headers=headers)
    return _normal(resp.status, resp.json if resp.body else None)


async def _double(http: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]) -> Answer:
    resp = await http.post(path, json=body, headers=headers)
    return _normal(resp.status_code, resp.json() if resp.content else None)


@pytest.fixture
async def double() -> Any:
    api = FakeApi(SERVICE_TOKEN)
    await api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url) as http:
            yield api, http
    finally:
        await api.close()


async def test_authorize_and_attach_events_answer_alike(app: Sanic, sessions: Any, provider: FakeProvider,
                                                         double: tuple[FakeApi, httpx.AsyncClient]) -> None:
    fake, http = double
    # The real world: an org with an owner, a teammate, an admin and a disabled user; another org.
    alice = await make_tenant(sessions, "acme", plan="pro")
    carol = await admin.create_user(sessions, "carol@acme.example", "acme")
    root = await admin.create_user(sessions, "root@acme.example", "acme", role="admin")
    dave = await admin.create_user(sessions, "dave@acme.example", "acme")
    await admin.set_user_active(sessions, dave.email, False)
    mallory = await make_tenant(sessions, "evil")
    running, runner = await new_session(app, alice, provider)
    await beat(app, running, runner, host_key=HOST_KEY, ssh_host="10.0.0.5", ssh_port=2222, init_status="none")
    stopped, _ = await new_session(app, alice, provider)
    await app.asgi_client.post(f"/v1/instances/{stopped}/stop", headers=alice.headers)
    failed, failed_runner = await new_session(app, alice, provider)
    await beat(app, failed, failed_runner, fatal_error="clone failed: repository not found")
    await app.ctx.state.instances.wait_background()

    # The same world in the stand-in.
    fake.users.update({alice.user_id: "acme", carol.id: "acme", root.id: "acme", dave.id: "acme",
                       mallory.user_id: "evil"})
    fake.admins.add(root.id)
    fake.disabled_users.add(dave.id)
    route = {"host": "10.0.0.5", "port": 2222, "host_key": HOST_KEY}
    fake.sessions.update({
        running: FakeSession(owner=alice.user_id, route=route),
        stopped: FakeSession(owner=alice.user_id, state="stopped", wake_polls=99),
        failed: FakeSession(owner=alice.user_id, state="failed", reason="clone failed: repository not found"),
    })

    service = {"Authorization": f"Bearer {SERVICE_TOKEN}"}

    def auth(sid: str, user: str, **extra: object) -> dict[str, Any]:
        return {"session_id": sid, "user_id": user, "method": "jwt" if "jti" in extra else "certificate", **extra}

    cases: list[tuple[str, str, dict[str, Any], dict[str, str]]] = [
        ("owner, running", "/internal/v1/authorize", auth(running, alice.user_id), service),
        ("owner, read-only", "/internal/v1/authorize", auth(running, alice.user_id, readonly=True), service),
        ("teammate", "/internal/v1/authorize", auth(running, carol.id), service),
        ("teammate's jti is not spent", "/internal/v1/authorize",
         auth(running, carol.id, jti="j-carol", jti_expires_at=JTI_EXP), service),
        ("org admin", "/internal/v1/authorize", auth(running, root.id), service),
        ("other org", "/internal/v1/authorize", auth(running, mallory.user_id), service),
        ("no such session", "/internal/v1/authorize", auth("nope-123456", alice.user_id), service),
        ("unknown user", "/internal/v1/authorize", auth(running, "usr_nobody"), service),
        ("disabled user", "/internal/v1/authorize", auth(running, dave.id), service),
        ("jti first use", "/internal/v1/authorize",
         auth(running, alice.user_id, jti="j-carol", jti_expires_at=JTI_EXP), service),
        ("jti replayed", "/internal/v1/authorize",
         auth(running, alice.user_id, jti="j-carol", jti_expires_at=JTI_EXP), service),
        ("failed session", "/internal/v1/authorize", auth(failed, alice.user_id), service),
        ("stopped, no wake", "/internal/v1/authorize", auth(stopped, alice.user_id, wake=False), service),
        ("stopped, wake", "/internal/v1/authorize", auth(stopped, alice.user_id), service),
        ("no service token", "/internal/v1/authorize", auth(running, alice.user_id), {}),
        ("wrong service token", "/internal/v1/authorize", auth(running, alice.user_id),
         {"Authorization": "Bearer nope"}),
        ("attach event", "/internal/v1/attach-events", {
            "session_id": running, "user_id": alice.user_id, "event": "attached", "connection_id": "c1"}, service),
        ("attach event, no such session", "/internal/v1/attach-events", {
            "session_id": "nope-123456", "user_id": alice.user_id, "event": "attached", "connection_id": "c1"},
         service),
        ("a failed authentication", "/internal/v1/auth-failures", {"source_address": "192.0.2.7"}, service),
        ("another from the same address", "/internal/v1/auth-failures", {"source_address": "192.0.2.7"}, service),
        ("a failed authentication, no service token", "/internal/v1/auth-failures",
         {"source_address": "192.0.2.7"}, {}),
    ]
    for name, path, body, headers in cases:
        real = await _real(app, path, body, headers)
        stand_in = await _double(http, path, body, headers)
        assert stand_in == real, f"{name}: stand-in {stand_in} != real API {real}"
