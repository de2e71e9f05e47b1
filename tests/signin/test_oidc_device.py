"""Device sign-in with an OIDC issuer, brokered by the API: what a person and an attacker would notice."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from api import admin
from api.db.models import ApiToken, DeviceGrant, RefreshToken, User
from api.settings import Settings
from tests.conftest import both_databases
from tests.signin.conftest import make_app, poll, signin_settings, start
from tests.signin.standins import OidcStandIn

pytestmark = pytest.mark.usefixtures("default_org")


@pytest.fixture
def app(settings: Settings, oidc: OidcStandIn):  # type: ignore[no-untyped-def]
    return make_app(signin_settings(settings, oidc))


async def sign_in(app, oidc: OidcStandIn, **token_args):  # type: ignore[no-untyped-def]
    started = await start(app)
    oidc.approve(started["user_code"], **token_args)
    return started, await poll(app, started["device_code"])


@both_databases
async def test_device_sign_in_creates_the_user_and_gets_tokens(app, oidc, sessions, settings, caplog):
    caplog.set_level(logging.DEBUG)
    started = await start(app)
    assert started["provider"] == "oidc" and started["user_code"] and started["interval"] == 1
    assert started["verification_uri"] == f"{oidc.url}/device"
    assert started["device_code"].startswith("orzd_")
    pending = await poll(app, started["device_code"])
    assert pending.status == 400 and pending.json["code"] == "authorization_pending"
    assert pending.content_type == "application/problem+json"
    time.sleep(1.05)  # the interval, so the next poll is not a slow_down
    oidc.approve(started["user_code"], email="Ada@Example.com", preferred_username="ada")
    done = await poll(app, started["device_code"])
    assert done.status == 200, done.json
    grant = done.json
    assert grant["token_type"] == "Bearer" and grant["expires_in"] == 3600 and grant["source"] == "oidc:Test IdP"
    assert grant["refresh_token"].startswith("orzrt_") and done.headers["cache-control"] == "no-store"
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {grant['access_token']}"})
    assert me.status == 200 and me.json["user"]["email"] == "ada@example.com"
    assert me.json["org"]["name"] == "default" and me.json["source"] == "oidc:Test IdP"
    # Both tokens are stored as hashes only.
    async with sessions() as db:
        rows = [*(await db.scalars(select(ApiToken))), *(await db.scalars(select(RefreshToken)))]
    assert len(rows) == 2 and all(r.expires_at is not None for r in rows)
    for value in (grant["access_token"], grant["refresh_token"], started["device_code"],
                  *[d for d in oidc.devices]):  # ours and the provider's device codes
        assert value not in caplog.text
    if settings.database_url.startswith("sqlite"):
        db_bytes = Path(settings.database_url.split("///", 1)[1]).read_bytes()
        for value in (grant["access_token"], grant["refresh_token"], started["device_code"]):
            assert value.encode() not in db_bytes


@both_databases
async def test_the_device_code_is_single_use(app, oidc):
    started, done = await sign_in(app, oidc, email="ada@example.com")
    assert done.status == 200
    again = await poll(app, started["device_code"])
    assert again.status == 400 and again.json["code"] == "invalid_grant"
    assert "already used" in again.json["detail"]
    wrong = await poll(app, started["device_code"][:-3] + "AAA")
    assert wrong.status == 400 and wrong.json["code"] == "invalid_grant"


async def test_expired_device_codes_are_refused_and_swept(app, oidc, sessions):
    started = await start(app)
    async with sessions() as db:
        await db.execute(update(DeviceGrant).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        await db.commit()
    expired = await poll(app, started["device_code"])
    assert expired.status == 400 and expired.json["code"] == "expired_token"
    stale = await start(app)
    async with sessions() as db:
        await db.execute(update(DeviceGrant).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        await db.commit()
    await start(app)  # each start sweeps expired ones
    async with sessions() as db:
        assert len(list(await db.scalars(select(DeviceGrant)))) == 1
    assert (await poll(app, stale["device_code"])).json["code"] == "invalid_grant"


async def test_polling_faster_than_the_interval_is_slowed_down(app, oidc):
    started = await start(app)
    assert (await poll(app, started["device_code"])).json["code"] == "authorization_pending"
    fast = await poll(app, started["device_code"])
    assert fast.status == 400 and fast.json["code"] == "slow_down" and fast.json["interval"] == 6


@pytest.mark.parametrize(("token_args", "status", "fragment"), [
    ({"aud": "someone-else"}, 401, "another client"),
    ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, 401, "expired"),
    ({"iss": "https://evil.example"}, 401, "another issuer"),
    ({"email_verified": False}, 403, "not verified"),
    ({"email_verified": None}, 403, "not verified"),
    ({"forged": True}, 401, "not valid"),
    ({"aud": ["orz-test", "other"], "azp": "other"}, 401, "azp"),
], ids=["wrong-audience", "expired", "issuer-mix-up", "unverified-email", "no-email-verified", "bad-signature",
        "azp"])
async def test_id_tokens_that_fail_a_check_sign_nobody_in(app, oidc, sessions, token_args, status, fragment):
    _, done = await sign_in(app, oidc, email="mallory@example.com", **token_args)
    assert done.status == status, done.json
    assert done.content_type == "application/problem+json"
    assert fragment in done.json["detail"]
    async with sessions() as db:
        assert (await db.scalar(select(User).where(User.email == "mallory@example.com"))) is None
        assert list(await db.scalars(select(ApiToken))) == []


@pytest.mark.parametrize(("shifts", "fragment", "offset"), [
    ({"iat": 600, "exp": 900}, "clock is ahead", "iat +"),
    ({"iat": -900, "exp": -600}, "clock and this server's disagree", "exp -"),
], ids=["provider-clock-ahead", "provider-clock-behind"])
async def test_a_provider_with_a_skewed_clock_is_named_as_the_cause(app, oidc, caplog, shifts, fragment, offset):
    """A provider whose clock is off by more than the allowed skew: the person is told it is the clocks (not
    an anonymous 'not valid: ImmatureSignatureError'), the operator's log says by how much."""
    caplog.set_level(logging.INFO)
    # From now, not from collection: a full run reaches this test more than 15 minutes after it starts.
    times = {claim: int(time.time()) + shift for claim, shift in shifts.items()}
    _, done = await sign_in(app, oidc, email="ada@example.com", **times)
    assert done.status == 401 and done.json["code"] == "invalid_id_token"
    assert fragment in done.json["detail"] and "ORZ_SIGNIN_CLOCK_SKEW_S" in done.json["detail"]
    assert "Error" not in done.json["detail"]
    warning = next(r.getMessage() for r in caplog.records if "id_token times" in r.getMessage())
    assert offset in warning and "skew allowed: 60 s" in warning


async def test_a_discovery_document_naming_another_issuer_is_refused(settings, oidc):
    oidc.discovery_issuer = "https://accounts.example.com"
    app = make_app(signin_settings(settings, oidc))
    _, resp = await app.asgi_client.post("/v1/auth/device", json={})
    assert resp.status == 502 and "another issuer" in resp.json["detail"]


async def test_allowed_domains_and_pending_approval(settings, oidc, sessions):
    app = make_app(signin_settings(settings, oidc, signin_allowed_domains="example.com",
                                   signin_new_users="pending"))
    _, outside = await sign_in(app, oidc, email="eve@elsewhere.org")
    assert outside.status == 403 and outside.json["code"] == "signin_refused"
    assert "example.com" in outside.json["detail"]

    _, first = await sign_in(app, oidc, email="bob@example.com")
    assert first.status == 403 and first.json["code"] == "approval_pending"
    assert "orz admin approve bob@example.com" in first.json["detail"]
    assert [u.email for u in await admin.pending_users(sessions)] == ["bob@example.com"]
    await admin.approve_user(sessions, "bob@example.com")
    _, second = await sign_in(app, oidc, email="bob@example.com")
    assert second.status == 200, second.json

    await admin.set_user_active(sessions, "bob@example.com", False)
    _, disabled = await sign_in(app, oidc, email="bob@example.com")
    assert disabled.status == 403 and disabled.json["detail"] == "this account is disabled"


async def test_refuse_lets_in_only_users_an_admin_created(settings, oidc, sessions):
    app = make_app(signin_settings(settings, oidc, signin_new_users="refuse"))
    _, stranger = await sign_in(app, oidc, email="stranger@example.com")
    assert stranger.status == 403 and "ask an admin" in stranger.json["detail"]
    await admin.create_user(sessions, "known@example.com", "default", role="admin")
    _, known = await sign_in(app, oidc, email="known@example.com")
    assert known.status == 200
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {known.json['access_token']}"})
    assert me.json["user"]["role"] == "admin"  # the existing user, linked by the verified email


async def refresh(app, value: str):  # type: ignore[no-untyped-def]
    _, resp = await app.asgi_client.post("/v1/auth/token", json={"grant_type": "refresh_token",
                                                                 "refresh_token": value})
    return resp


@both_databases
async def test_refresh_rotates_and_a_replayed_refresh_token_revokes_the_sign_in(app, oidc):
    _, done = await sign_in(app, oidc, email="ada@example.com")
    first = done.json
    second = await refresh(app, first["refresh_token"])
    assert second.status == 200 and second.json["refresh_token"] != first["refresh_token"]
    assert second.json["source"] == "oidc:Test IdP"
    replay = await refresh(app, first["refresh_token"])
    assert replay.status == 400 and replay.json["code"] == "invalid_grant"
    # The replay revoked everything of that sign-in: the newest tokens too.
    assert (await refresh(app, second.json["refresh_token"])).status == 400
    app.ctx.state.principals._entries.clear()  # the API trusts a verified token for up to 5 s
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {second.json['access_token']}"})
    assert me.status == 401


async def test_revoke_ends_the_token_and_its_refresh_token_at_once(app, oidc):
    _, done = await sign_in(app, oidc, email="ada@example.com")
    headers = {"Authorization": f"Bearer {done.json['access_token']}"}
    assert (await app.asgi_client.get("/v1/me", headers=headers))[1].status == 200
    _, revoked = await app.asgi_client.post("/v1/auth/revoke", headers=headers)
    assert revoked.status == 204
    assert (await app.asgi_client.get("/v1/me", headers=headers))[1].status == 401
    assert (await refresh(app, done.json["refresh_token"])).status == 400


@pytest.mark.parametrize(("given", "named"), [
    ({"oidc_issuer": "https://idp.example", "oidc_client_secret": "s3cret-value"}, "ORZ_OIDC_CLIENT_ID not set"),
    ({"oidc_client_id": "orz-cloud"}, "ORZ_OIDC_ISSUER not set"),
    ({"github_client_secret": "s3cret-value"}, "ORZ_GITHUB_CLIENT_ID is not"),
], ids=["issuer-without-client-id", "client-id-without-issuer", "github-secret-without-client-id"])
async def test_a_half_configured_provider_is_named_at_start(settings, caplog, given, named):
    """An operator who forgot ORZ_OIDC_CLIENT_ID got a server that started without a word, and users
    told "this server has no identity provider configured": the start now says which setting is missing."""
    caplog.set_level(logging.WARNING)
    app = make_app(Settings(**{**settings.model_dump(), "github_api_url": "", **given}))
    await app.asgi_client.get("/healthz")  # the app starts (and builds its sign-in service) on the first request
    warnings = [r.getMessage() for r in caplog.records if "sign-in is off" in r.getMessage()]
    assert len(warnings) == 1 and named in warnings[0], caplog.text
    assert "s3cret-value" not in caplog.text


async def test_a_wrong_client_secret_is_named_as_the_cause(settings, oidc, caplog):
    """The provider refusing the server's own client (401 invalid_client) said only "answered 401 to the device
    authorization", which reads like the user's fault: it now names the client id and secret, never the secret."""
    caplog.set_level(logging.DEBUG)
    wrong = make_app(signin_settings(settings, oidc, oidc_client_secret="not-the-secret-x1"))
    _, resp = await wrong.asgi_client.post("/v1/auth/device", json={})
    assert resp.status == 502 and "did not accept this server's client id and secret" in resp.json["detail"], resp.json
    assert "not-the-secret-x1" not in resp.text and "not-the-secret-x1" not in caplog.text

async def test_no_provider_configured_says_how_to_log_in(app, settings):
    bare = make_app(settings)
    _, resp = await bare.asgi_client.post("/v1/auth/device", json={})
    assert resp.status == 404 and "--with-token" in resp.json["detail"]
    _, listing = await bare.asgi_client.get("/v1/auth/providers")
    assert listing.json == {"providers": []}
    _, listing = await app.asgi_client.get("/v1/auth/providers")
    assert listing.json == {"providers": ["oidc"]}


@both_databases
async def test_a_flood_of_sign_ins_cannot_lock_out_a_new_user(app, oidc, sessions, monkeypatch):
    """The table of sign-ins in progress is bounded (the start routes take no credential), but a full one
    makes room by dropping the oldest sign-in nobody finished: a flood from many addresses cannot keep a
    new person out, it only ends the flood's own oldest attempts."""
    from api.signin import service

    monkeypatch.setattr(service, "MAX_PENDING", 3)
    flood = [await start(app) for _ in range(3)]
    async with sessions() as db:
        assert len(list(await db.scalars(select(DeviceGrant)))) == 3
    _, done = await sign_in(app, oidc, email="ada@example.com")  # the table is full: ada still gets in
    assert done.status == 200 and done.json["access_token"].startswith("orz_"), done.json
    async with sessions() as db:
        assert len(list(await db.scalars(select(DeviceGrant)))) == 3
    # The oldest unfinished one made room; the newer ones are still waiting for their person.
    gone = await poll(app, flood[0]["device_code"])
    assert gone.status == 400 and gone.json["code"] == "invalid_grant", gone.json
    waiting = await poll(app, flood[2]["device_code"])
    assert waiting.status == 400 and waiting.json["code"] == "authorization_pending", waiting.json


async def test_disabling_a_user_ends_their_sign_in_and_keeps_them_out(app, oidc, sessions):
    """Disabled users stay out: the API token stops working, the refresh token renews nothing, and
    signing in again (another device code) is refused."""
    _, done = await sign_in(app, oidc, email="ada@example.com")
    headers = {"Authorization": f"Bearer {done.json['access_token']}"}
    assert (await app.asgi_client.get("/v1/me", headers=headers))[1].status == 200
    await admin.set_user_active(sessions, "ada@example.com", False)
    app.ctx.state.principals._entries.clear()  # the API trusts a verified token for up to 5 s
    _, me = await app.asgi_client.get("/v1/me", headers=headers)
    assert me.status == 401
    renewed = await refresh(app, done.json["refresh_token"])
    assert renewed.status == 403 and renewed.json["detail"] == "this account is disabled"
    _, again = await sign_in(app, oidc, email="ada@example.com")
    assert again.status == 403 and again.json["detail"] == "this account is disabled"
    async with sessions() as db:  # and no token was issued for any of it
        assert len(list(await db.scalars(select(ApiToken)))) == 1
    # Enabled again, they sign in again: the sign-in from before stays revoked (it may be what leaked).
    await admin.set_user_active(sessions, "ada@example.com", True)
    app.ctx.state.principals._entries.clear()
    assert (await app.asgi_client.get("/v1/me", headers=headers))[1].status == 401
    assert (await refresh(app, done.json["refresh_token"])).json["code"] == "invalid_grant"
    _, back = await sign_in(app, oidc, email="ada@example.com")
    assert back.status == 200, back.json


async def test_a_browser_sign_in_that_took_too_long_is_refused(settings, oidc, sessions):
    from api.db.models import SigninState

    app = make_app(signin_settings(settings, oidc, public_web_url="https://web.example.com"))
    service = {"Authorization": "Bearer svc-test-token-0123456789"}
    callback = "https://web.example.com/s/callback"
    _, started = await app.asgi_client.post("/internal/v1/signin/start", headers=service,
                                            json={"redirect_uri": callback})
    code = oidc.authorize(started.json["authorization_url"], email="ada@example.com")
    async with sessions() as db:
        await db.execute(update(SigninState).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        await db.commit()
    _, late = await app.asgi_client.post("/internal/v1/signin/finish", headers=service, json={
        "state": started.json["state"], "code": code, "redirect_uri": callback})
    assert late.status == 400 and late.json["code"] == "expired_token" and "start again" in late.json["detail"]
    assert not oidc.codes[code]["used"]  # the provider was not asked to redeem it


async def test_a_person_who_denies_the_device_gets_no_account(app, oidc, sessions):
    started = await start(app)
    oidc.deny(started["user_code"])
    denied = await poll(app, started["device_code"])
    assert denied.status == 400 and denied.json["code"] == "access_denied"
    assert denied.content_type == "application/problem+json"
    async with sessions() as db:
        assert list(await db.scalars(select(User))) == [] and list(await db.scalars(select(ApiToken))) == []
