"""The API across PostgreSQL restarts: pooled connections the server closed are replaced, an outage is a 503."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from api.app import create_app
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from tests.conftest import POSTGRES_ADMIN_URL, _pg_exec, make_tenant

pytestmark = pytest.mark.postgres
POSTGRES = [pytest.param("postgres")]


@pytest.fixture
async def api(settings):
    """A real API listener, so its connection pool lives across requests as in production."""
    srv = await ApiServer.start(create_app(settings, provider=FakeProvider()), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}", timeout=30) as http:
            yield http
    finally:
        await srv.stop()


async def _terminate_backends(database: str) -> None:
    """What a server restart or failover does to the API's pooled connections."""
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    finally:
        await conn.close()
    # The API's event loop has to see the sockets close; a restart is never faster than this.
    await asyncio.sleep(0.3)


@pytest.mark.parametrize("empty_database_url", POSTGRES, indirect=True)
async def test_requests_after_the_server_closed_pooled_connections_succeed(api: httpx.AsyncClient, sessions,
                                                                            database_url):
    t = await make_tenant(sessions, "acme")
    resp = await api.post("/v1/instances", json={}, headers=t.headers)
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    # Several requests at once so the pool holds more than one connection when they are killed.
    replies = await asyncio.gather(*(api.get(f"/v1/instances/{sid}", headers=t.headers) for _ in range(6)))
    assert [r.status_code for r in replies] == [200] * 6

    await _terminate_backends(make_url(database_url).database or "")

    replies = await asyncio.gather(*(api.get(f"/v1/instances/{sid}", headers=t.headers) for _ in range(6)))
    assert [r.status_code for r in replies] == [200] * 6
    resp = await api.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    assert resp.status_code == 200 and resp.json()["status"] == "stopped"


@pytest.mark.parametrize("empty_database_url", POSTGRES, indirect=True)
async def test_database_outage_is_a_retryable_503_problem_without_connection_details(api: httpx.AsyncClient,
                                                                                      sessions, database_url):
    t = await make_tenant(sessions, "acme")
    resp = await api.get("/v1/instances", headers=t.headers)
    assert resp.status_code == 200
    database = make_url(database_url).database or ""
    await _pg_exec(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        await _terminate_backends(database)
        # The first request finds its pooled connection dead, the second fails to open a new one.
        for _ in range(2):
            resp = await api.get("/v1/instances", headers=t.headers)
            assert resp.status_code == 503
            assert resp.headers["content-type"] == "application/problem+json"
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["code"] == "database_unavailable"
            assert database not in resp.text and "5432" not in resp.text
        # The OpenAPI document says so (it is served without the database).
        doc = (await api.get("/v1/openapi.json")).json()
        assert "503" in doc["paths"]["/v1/instances"]["get"]["responses"]
    finally:
        await _pg_exec(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    resp = await api.get("/v1/instances", headers=t.headers)
    assert resp.status_code == 200
