"""Quotas hold under concurrency: a real HTTP server, 20 simultaneous creates, one free org."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import select

from api.app import create_app
from api.db.models import Org
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from tests.conftest import both_databases, make_tenant


@pytest.fixture
async def server(settings):
    srv = await ApiServer.start(create_app(settings, provider=FakeProvider()), "127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


@both_databases
async def test_twenty_concurrent_creates_on_free_plan_exactly_two_succeed(server, sessions):
    t = await make_tenant(sessions, "acme")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=t.headers,
                                 timeout=60, limits=httpx.Limits(max_connections=20)) as http:
        responses = await asyncio.gather(*[
            http.post("/v1/instances", json={"repo_url": "https://example.com/a/repo.git"}) for _ in range(20)
        ])
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] * 2 + [429] * 18
        refusal = next(r for r in responses if r.status_code == 429)
        assert refusal.headers["content-type"] == "application/problem+json"
        body = refusal.json()
        assert body["limit"] == 2 and body["current"] == 2
        assert "2 active sessions" in body["detail"]
        listed = (await http.get("/v1/instances")).json()
        assert len(listed["instances"]) == 2
        assert listed["quota"] == {"limit": 2, "active": 2, "plan": "free"}


async def test_stopped_sessions_do_not_count_and_start_is_quota_checked(server, sessions):
    t = await make_tenant(sessions, "acme")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=t.headers) as http:
        a = (await http.post("/v1/instances", json={})).json()["id"]
        await http.post("/v1/instances", json={})
        assert (await http.post("/v1/instances", json={})).status_code == 429
        assert (await http.post(f"/v1/instances/{a}/stop")).json()["status"] == "stopped"
        c = await http.post("/v1/instances", json={})
        assert c.status_code == 201
        again = await http.post(f"/v1/instances/{a}/start")
        assert again.status_code == 429
        assert again.json()["limit"] == 2


async def test_orgs_have_separate_quotas(server, sessions):
    a = await make_tenant(sessions, "acme")
    b = await make_tenant(sessions, "other", plan="pro")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        for _ in range(2):
            assert (await http.post("/v1/instances", json={}, headers=a.headers)).status_code == 201
        for _ in range(5):
            assert (await http.post("/v1/instances", json={}, headers=b.headers)).status_code == 201
        assert (await http.post("/v1/instances", json={}, headers=b.headers)).json()["limit"] == 5


async def test_real_server_enforces_body_limit(server, sessions):
    t = await make_tenant(sessions, "acme")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=t.headers) as http:
        resp = await http.post("/v1/instances", content=b"x" * (1024 * 1024))
        assert resp.status_code == 413


async def test_the_quota_check_serializes_on_its_own_org_row_only(server, sessions):
    a = await make_tenant(sessions, "acme")
    b = await make_tenant(sessions, "bobco")

    async def serials() -> dict[str, int]:
        async with sessions() as db:
            return {o.name: o.quota_serial for o in await db.scalars(select(Org))}

    before = await serials()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=a.headers) as http:
        assert (await http.post("/v1/instances", json={})).status_code == 201
    after = await serials()
    assert after == {**before, "acme": before["acme"] + 1}
    assert b.org == "bobco"


async def test_quota_refusal_names_plan_limit_and_count(server, sessions):
    t = await make_tenant(sessions, "acme")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=t.headers) as http:
        for _ in range(2):
            await http.post("/v1/instances", json={})
        refused = await http.post("/v1/instances", json={})
    assert refused.status_code == 429
    body = refused.json()
    assert (body["limit"], body["current"], body["plan"]) == (2, 2, "free")
    assert body["detail"] == "your free plan allows 2 active sessions and 2 are active; stop or kill one first"
