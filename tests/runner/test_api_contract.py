"""The runner tests' API stand-in (fake_api.FakeApi) answers heartbeats like the real API.

The same heartbeat requests go to the real API (create_app on SQLite) and to the stand-in told the
same runner tokens; status, problem code and detail must be equal, and a 200 must be a HeartbeatReply.
"""

from __future__ import annotations

from typing import Any

import httpx
from sanic import Sanic

from api import schemas
from api.instances.providers.fake import FakeProvider
from tests.api.test_internal import new_session
from tests.conftest import make_tenant
from tests.runner.fake_api import FakeApi

Answer = tuple[int, Any]


def _normal(status: int, body: dict[str, Any]) -> Answer:
    if status >= 400:
        return status, (body.get("code"), body.get("detail"))
    schemas.HeartbeatReply.model_validate(body)
    return status, sorted(body)


async def test_heartbeats_are_accepted_and_refused_alike(app: Sanic, sessions: Any, provider: FakeProvider) -> None:
    tenant = await make_tenant(sessions, "acme")
    sid, own = await new_session(app, tenant, provider)
    other, other_runner = await new_session(app, tenant, provider)
    fake = await FakeApi().start()
    fake.expect(sid, own["Authorization"].removeprefix("Bearer "))
    fake.expect(other, other_runner["Authorization"].removeprefix("Bearer "))
    cases: list[tuple[str, str, dict[str, str]]] = [
        ("own token", sid, own),
        ("another session's token", sid, other_runner),
        ("no token", sid, {}),
        ("empty header", sid, {"Authorization": ""}),
        ("not a bearer token", sid, {"Authorization": "Basic abc"}),
        ("an API token", sid, tenant.headers),
        ("a guess", sid, {"Authorization": "Bearer orzr_" + "x" * 43}),
        ("unknown session", "nope-123456", own),
    ]
    try:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            for name, session_id, headers in cases:
                path = f"/internal/v1/instances/{session_id}/heartbeat"
                _, resp = await app.asgi_client.post(path, json={}, headers=headers)
                real = _normal(resp.status, resp.json)
                got = await http.post(path, json={}, headers=headers)
                stand_in = _normal(got.status_code, got.json())
                assert stand_in == real, f"{name}: stand-in {stand_in} != real API {real}"
    finally:
        await fake.close()
