"""The recording route with a provider that cannot serve recordings (the fake one stands in for Kubernetes,
which does not serve them yet): its runners are not asked to record, and the route says why there is none."""

from __future__ import annotations

from sanic import Sanic

from api.instances.providers.fake import FakeProvider
from tests.conftest import make_tenant


async def test_a_provider_without_recordings_records_nothing_and_the_route_says_so(
        app: Sanic, sessions, provider: FakeProvider) -> None:
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={"program": "bash"}, headers=t.headers)
    assert resp.status == 201, resp.text
    sid = resp.json["id"]
    assert provider.specs[sid].recording_max_bytes == 0
    _, resp = await app.asgi_client.get(f"/v1/instances/{sid}/recording", headers=t.headers)
    assert resp.status == 404 and resp.headers["content-type"] == "application/problem+json"
    assert resp.json["detail"] == f"session {sid} has no recording here: the fake provider does not serve recordings"
    _, resp = await app.asgi_client.get("/v1/instances/no-such-one/recording", headers=t.headers)
    assert resp.status == 404 and resp.json["detail"] == "no such session: no-such-one"


async def test_the_openapi_document_describes_the_recording_as_asciicast(app: Sanic) -> None:
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    ok = resp.json["paths"]["/v1/instances/{id}/recording"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["application/x-asciicast"]
