"""Failed authentications counted once for every gateway replica (api/failed_auth.py), on both databases."""

from __future__ import annotations

import pytest
from sanic import Sanic
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import failed_auth
from api.settings import Settings
from tests.conftest import both_databases

T0 = 1_800_000_000.0  # a bucket boundary for a 60 s window (10 s buckets)


@both_databases
async def test_the_count_is_shared_and_blocks_at_the_limit_until_the_window_passes(
        sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
    settings = settings.model_copy(update={"auth_fail_limit": 3, "auth_fail_window_s": 60})
    # Two gateways report failures from one address; a third address is untouched.
    replies = [await failed_auth.record(sessions, "198.51.100.7", settings, now=T0 + i) for i in range(3)]
    assert [(r.failures, r.retry_after_s) for r in replies] == [(1, 0), (2, 0), (3, 58)]  # until T0 + 60
    other = await failed_auth.record(sessions, "198.51.100.8", settings, now=T0 + 3)
    assert (other.failures, other.retry_after_s) == (1, 0)
    # Half a window later the address still waits, for the rest of it.
    later = await failed_auth.record(sessions, "198.51.100.7", settings, now=T0 + 30)
    assert (later.failures, later.retry_after_s) == (4, 30)
    # Once the burst left the window only the later failure counts.
    after = await failed_auth.record(sessions, "198.51.100.7", settings, now=T0 + 65)
    assert (after.failures, after.retry_after_s) == (2, 0)


@both_databases
async def test_purge_forgets_buckets_that_left_the_window(sessions: async_sessionmaker[AsyncSession],
                                                         settings: Settings) -> None:
    await failed_auth.record(sessions, "198.51.100.7", settings, now=T0)
    await failed_auth.record(sessions, "198.51.100.7", settings, now=T0 + settings.auth_fail_window_s)
    async with sessions() as db:
        assert await failed_auth.purge(db, settings, now=T0 + settings.auth_fail_window_s) == 1
        await db.commit()
    assert await failed_auth.count(sessions, "198.51.100.7") == 1


@pytest.mark.parametrize("body", [{}, {"source_address": ""}, {"source_address": "x" * 65}])
async def test_the_route_refuses_a_bad_body(app: Sanic, settings: Settings, body: dict) -> None:
    headers = {"Authorization": f"Bearer {settings.service_token.get_secret_value()}"}
    _, response = await app.asgi_client.post("/internal/v1/auth-failures", json=body, headers=headers)
    assert response.status == 422 and response.headers["content-type"].startswith("application/problem+json")
