"""The per-address limit on the sign-in routes anyone may call (device start and polls, refresh, the Go
CLI's exchange, the browser's start and callback): counted in the database by api/failed_auth.py, so
API replicas share it; beyond it 429 problem+json with Retry-After."""

from __future__ import annotations

import asyncio

import pytest

from api import failed_auth
from api.settings import Settings
from tests.conftest import both_databases
from tests.signin.conftest import DEVICE_GRANT, make_app, poll, signin_settings, start
from tests.signin.standins import GitHubStandIn, OidcStandIn

pytestmark = pytest.mark.usefixtures("default_org")
SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}
CALLBACK = "https://web.example.com/s/callback"
LIMIT = 3


def limited(settings: Settings, oidc: OidcStandIn, github: GitHubStandIn | None = None) -> Settings:
    return signin_settings(settings, oidc, github, signin_rate_limit=LIMIT, auth_fail_window_s=60,
                           public_web_url="https://web.example.com")


def assert_too_many(resp) -> int:  # type: ignore[no-untyped-def]
    """A 429 problem whose Retry-After header and body agree; returns the seconds to wait."""
    assert resp.status == 429, resp.json
    assert resp.content_type == "application/problem+json" and resp.json["code"] == "rate_limited"
    wait = int(resp.headers["retry-after"])
    assert 1 <= wait <= 60 and resp.json["retry_after_s"] == wait
    assert f"try again in {wait} s" in resp.json["detail"]
    return wait


async def test_device_starts_beyond_the_limit_are_refused_on_every_sign_in_route(settings, oidc, github):
    app = make_app(limited(settings, oidc, github))
    for _ in range(LIMIT):
        await start(app)
    _, refused = await app.asgi_client.post("/v1/auth/device", json={})
    assert_too_many(refused)
    assert len(oidc.devices) == LIMIT  # the provider was not asked for the refused one
    # The same address is refused on the other sign-in routes too, before any work is done.
    assert_too_many(await poll(app, "orzd_whatever"))
    _, refresh = await app.asgi_client.post("/v1/auth/token", json={"grant_type": "refresh_token",
                                                                    "refresh_token": "orzrt_x"})
    assert_too_many(refresh)
    _, exchange = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": "gho_x", "github_id": 1})
    assert_too_many(exchange)
    assert ("GET", "/api/v3/user") not in github.requests


async def test_polls_at_the_interval_do_not_count_but_polling_too_fast_does(settings, oidc):
    app = make_app(limited(settings, oidc))
    started = await start(app)  # one attempt
    for _ in range(LIMIT):  # a person taking their time, the CLI polling at the interval (1 s here)
        assert (await poll(app, started["device_code"])).json["code"] == "authorization_pending"
        await asyncio.sleep(1.05)
    assert (await poll(app, started["device_code"])).json["code"] == "authorization_pending"
    assert (await poll(app, started["device_code"])).json["code"] == "slow_down"  # two attempts
    assert (await poll(app, started["device_code"])).json["code"] == "slow_down"  # three
    assert_too_many(await poll(app, started["device_code"]))


async def test_guessed_device_codes_and_refresh_tokens_count(settings, oidc):
    app = make_app(limited(settings, oidc))
    started = await start(app)  # one attempt
    assert (await poll(app, started["device_code"][:-4] + "AAAA")).json["code"] == "invalid_grant"
    _, bad_refresh = await app.asgi_client.post("/v1/auth/token", json={"grant_type": "refresh_token",
                                                                        "refresh_token": "orzrt_guess"})
    assert bad_refresh.json["code"] == "invalid_grant"
    # Three attempts: the genuine poll is refused as well now, until the window passes.
    assert_too_many(await poll(app, started["device_code"]))


async def test_the_window_passing_lets_the_address_in_again(settings, oidc, monkeypatch):
    app = make_app(limited(settings, oidc))
    for _ in range(LIMIT):
        await start(app)
    _, refused = await app.asgi_client.post("/v1/auth/device", json={})
    wait = assert_too_many(refused)
    later = failed_auth.time.time() + wait + 1
    monkeypatch.setattr(failed_auth.time, "time", lambda: later)
    _, again = await app.asgi_client.post("/v1/auth/device", json={})
    assert again.status == 200, again.json


@both_databases
async def test_api_replicas_share_the_count(settings, oidc):
    one, two = make_app(limited(settings, oidc)), make_app(limited(settings, oidc))
    await start(one)
    await start(two)
    await start(one)
    _, refused = await two.asgi_client.post("/v1/auth/device", json={})
    assert_too_many(refused)


async def test_browser_sign_ins_count_per_browser_address(settings, oidc):
    """The web door passes the browser's address: one browser's failed callbacks do not lock out others."""
    app = make_app(limited(settings, oidc))

    async def callback(address: str):  # type: ignore[no-untyped-def]
        _, resp = await app.asgi_client.post("/internal/v1/signin/finish", headers=SERVICE, json={
            "state": "guessed", "code": "c", "redirect_uri": CALLBACK, "source_address": address})
        return resp

    for _ in range(LIMIT):
        assert (await callback("198.51.100.7")).status == 400
    assert_too_many(await callback("198.51.100.7"))
    _, start_refused = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE, json={
        "redirect_uri": CALLBACK, "source_address": "198.51.100.7"})
    assert_too_many(start_refused)
    assert (await callback("198.51.100.8")).status == 400  # another browser: refused for its state only
    _, other = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE, json={
        "redirect_uri": CALLBACK, "source_address": "198.51.100.8"})
    assert other.status == 200
    # The API's own callers (the CLI) are counted apart from the browsers the door speaks for.
    _, cli = await app.asgi_client.post("/v1/auth/token", json={"grant_type": DEVICE_GRANT,
                                                                "device_code": "orzd_guess"})
    assert cli.status == 400


@both_databases
async def test_sign_ins_from_one_ipv6_prefix_share_the_limit(settings, oidc):
    """A browser rotating through the addresses of its IPv6 /64 (any IPv6 host has one) is one browser."""
    app = make_app(limited(settings, oidc))

    async def start_browser(address: str):  # type: ignore[no-untyped-def]
        _, resp = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE, json={
            "redirect_uri": CALLBACK, "source_address": address})
        return resp

    for n in range(LIMIT):
        assert (await start_browser(f"2001:db8:7:8::{n + 1}")).status == 200
    assert_too_many(await start_browser("2001:db8:7:8:abcd::9"))
    assert (await start_browser("2001:db8:7:9::1")).status == 200  # the next /64: someone else
