"""api/auth.py called directly: the Authorization header, the service token, the token cache and the
API token check (expiry, revocation, disabled users, last-used bookkeeping)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from api import admin
from api import auth as api_auth
from api.auth import PrincipalCache, authenticate_api_token, bearer_token, check_service_token
from api.db.models import ApiToken
from api.errors import Unauthorized
from tests.conftest import make_tenant

MISSING = "missing Authorization: Bearer <token> header"
MALFORMED = "the Authorization header must be 'Bearer <token>'"


@pytest.mark.parametrize("header, detail", [
    (None, MISSING), ("", MISSING), ("Basic abc", MALFORMED), ("Bearer", MALFORMED), ("Bearer    ", MALFORMED),
    ("Bearerabc", MALFORMED),
])
def test_bearer_header_refusals_say_what_is_wrong(header, detail):
    with pytest.raises(Unauthorized) as err:
        bearer_token(header)
    assert str(err.value) == detail


@pytest.mark.parametrize("header", ["Bearer abc", "bearer abc", "BEARER abc", "Bearer  abc "])
def test_bearer_token_is_the_value_after_the_scheme(header):
    assert bearer_token(header) == "abc"


def test_service_token_must_match_exactly_and_an_unset_one_refuses_everyone():
    check_service_token("svc-secret", "svc-secret")
    for expected, presented in (("svc-secret", "svc-secreT"), ("svc-secret", "svc-secret "), ("svc-secret", ""),
                                ("", ""), ("", "anything")):
        with pytest.raises(Unauthorized) as err:
            check_service_token(expected, presented)
        assert str(err.value) == "invalid service token"


def who(n: int = 1) -> api_auth.Principal:
    return api_auth.Principal(user_id=f"usr_{n}", email=f"{n}@x.example", role="member", org_id="org_1",
                              org_name="x", plan="free")


def test_cache_returns_entries_until_their_ttl(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(api_auth.time, "monotonic", lambda: clock[0])
    cache = PrincipalCache(ttl_s=5)
    assert cache.get("d1") is None
    cache.put("d1", who(1))
    clock[0] = 1005.0
    assert cache.get("d1") == who(1)  # still valid at exactly ttl
    clock[0] = 1005.01
    assert cache.get("d1") is None
    assert "d1" not in cache._entries  # expired entries are dropped, not kept


def test_cache_with_zero_ttl_keeps_nothing_and_stays_bounded():
    assert (PrincipalCache().ttl_s, PrincipalCache().max_entries) == (1.0, 10_000)  # docs/security.md: 1 s
    off = PrincipalCache(ttl_s=0)
    off.put("d1", who(1))
    assert not off._entries and off.get("d1") is None
    short = PrincipalCache(ttl_s=1)
    short.put("d1", who(1))
    assert short.get("d1") == who(1)
    cache = PrincipalCache(ttl_s=60, max_entries=2)
    cache.put("d1", who(1))
    cache.put("d2", who(2))
    cache.put("d1", who(1))  # used again: now the freshest
    cache.put("d3", who(3))
    assert set(cache._entries) == {"d1", "d3"}
    assert cache.get("d1") == who(1) and cache.get("d2") is None


async def test_api_token_names_the_user_and_org(sessions):
    t = await make_tenant(sessions, "acme", plan="pro")
    got = await authenticate_api_token(sessions, t.token)
    assert (got.user_id, got.email, got.org_name, got.plan, got.is_admin) == (t.user_id, t.email, "acme", "pro", False)
    assert got.org_id.startswith("org") and got.actor == f"user:{t.user_id}"


@pytest.mark.parametrize("value", ["", "orz_", "abc", "orzr_" + "x" * 43])
async def test_values_that_are_not_api_tokens_are_refused(sessions, value):
    await make_tenant(sessions, "acme")
    with pytest.raises(Unauthorized) as err:
        await authenticate_api_token(sessions, value)
    assert str(err.value) == "invalid or revoked API token"


async def test_expired_token_is_refused_from_its_expiry_on(sessions):
    t = await make_tenant(sessions, "acme")
    soon = datetime.now(UTC) + timedelta(seconds=30)
    async with sessions() as db:
        await db.execute(update(ApiToken).values(expires_at=soon))
        await db.commit()
    assert (await authenticate_api_token(sessions, t.token)).user_id == t.user_id
    async with sessions() as db:
        await db.execute(update(ApiToken).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        await db.commit()
    with pytest.raises(Unauthorized, match="invalid or revoked API token"):
        await authenticate_api_token(sessions, t.token)


async def test_last_used_is_written_at_most_once_a_minute(sessions):
    t = await make_tenant(sessions, "acme")

    async def last_used() -> datetime | None:
        async with sessions() as db:
            return (await db.scalars(select(ApiToken.last_used_at))).one()

    assert await last_used() is None
    await authenticate_api_token(sessions, t.token)
    first = await last_used()
    assert first is not None and abs((datetime.now(UTC) - first).total_seconds()) < 5
    await authenticate_api_token(sessions, t.token)
    assert await last_used() == first  # within the minute: no write
    stale = datetime.now(UTC) - timedelta(minutes=2)
    async with sessions() as db:
        await db.execute(update(ApiToken).values(last_used_at=stale))
        await db.commit()
    await authenticate_api_token(sessions, t.token)
    assert (await last_used()) > stale + timedelta(minutes=1)


async def test_cached_token_skips_the_database_until_the_entry_expires(sessions):
    t = await make_tenant(sessions, "acme")
    cache = PrincipalCache(ttl_s=60)
    first = await authenticate_api_token(sessions, t.token, cache)
    await admin.set_user_active(sessions, t.email, False)
    # The documented window: a verified token is trusted for ttl_s per replica.
    assert await authenticate_api_token(sessions, t.token, cache) == first
    with pytest.raises(Unauthorized, match="this account is disabled"):
        await authenticate_api_token(sessions, t.token, PrincipalCache(ttl_s=60))
    with pytest.raises(Unauthorized, match="this account is disabled"):
        await authenticate_api_token(sessions, t.token)


async def test_a_revoked_token_stops_working_on_every_replica_within_a_second(sessions):
    """Each API replica keeps its own cache of verified tokens; revocation must not wait on any of them."""
    import asyncio

    from api.settings import Settings

    t = await make_tenant(sessions, "acme")
    replicas = [PrincipalCache(Settings().auth_cache_ttl_s) for _ in range(3)]
    for cache in replicas:
        assert (await authenticate_api_token(sessions, t.token, cache)).user_id == t.user_id
    async with sessions() as db:
        await db.execute(update(ApiToken).values(revoked_at=datetime.now(UTC)))
        await db.commit()
    await asyncio.sleep(1.05)
    for cache in replicas:
        with pytest.raises(Unauthorized, match="invalid or revoked"):
            await authenticate_api_token(sessions, t.token, cache)
