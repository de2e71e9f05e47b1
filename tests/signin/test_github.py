"""GitHub sign-in against a stand-in GitHub Enterprise at ORZ_GITHUB_BASE_URL: the device flow, org rules,
and the Go CLI's POST /v1/auth/exchange."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import select

from api import admin
from api.db.models import User
from api.settings import Settings
from tests.conftest import both_databases
from tests.signin.conftest import make_app, poll, signin_settings, start
from tests.signin.standins import GitHubAccount, GitHubStandIn

pytestmark = pytest.mark.usefixtures("default_org")
ADA = GitHubAccount(id=4242, login="ada", email="ada@example.com", orgs=("Acme",))


def test_the_api_url_follows_the_base_url(settings: Settings) -> None:
    assert Settings(github_base_url="https://github.com").github_api_url == "https://api.github.com"
    assert Settings(github_base_url="https://ghe.example.com/").github_api_url == "https://ghe.example.com/api/v3"


async def test_device_sign_in_with_github_enterprise(settings, github: GitHubStandIn):
    app = make_app(signin_settings(settings, github=github, signin_github_orgs="acme"))
    started = await start(app, "github")
    assert started["verification_uri"] == f"{github.url}/login/device" and started["provider"] == "github"
    assert (await poll(app, started["device_code"])).json["code"] == "authorization_pending"
    github.approve(started["user_code"], ADA)
    await asyncio.sleep(1.05)  # the interval, so the next poll is not a slow_down
    done = await poll(app, started["device_code"])
    assert done.status == 200, done.json
    assert done.json["source"] == "github"
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {done.json['access_token']}"})
    # The primary verified address, not the first one listed.
    assert me.json["user"]["email"] == "ada@example.com" and me.json["source"] == "github"
    assert ("GET", "/api/v3/user/orgs") in github.requests


async def test_github_org_rule_and_unverified_email(settings, github: GitHubStandIn):
    app = make_app(signin_settings(settings, github=github, signin_github_orgs="acme,initech"))
    outsider = GitHubAccount(id=7, login="eve", email="eve@example.com", orgs=("evilcorp",))
    started = await start(app, "github")
    github.approve(started["user_code"], outsider)
    done = await poll(app, started["device_code"])
    assert done.status == 403 and "members of acme, initech" in done.json["detail"]
    unverified = GitHubAccount(id=8, login="zed", email="zed@example.com", verified=False, orgs=("acme",))
    started = await start(app, "github")
    github.approve(started["user_code"], unverified)
    done = await poll(app, started["device_code"])
    assert done.status == 403 and "no verified primary email" in done.json["detail"]


async def test_github_team_rule(settings, github: GitHubStandIn):
    app = make_app(signin_settings(settings, github=github, signin_github_teams="Acme/platform"))
    for account, status in ((GitHubAccount(id=9, login="pat", email="pat@example.com", teams=("Acme/platform",)), 200),
                            (GitHubAccount(id=10, login="sam", email="sam@example.com", teams=("acme/sales",)), 403)):
        started = await start(app, "github")
        github.approve(started["user_code"], account)
        done = await poll(app, started["device_code"])
        assert done.status == status, done.json
    assert "teams acme/platform" in done.json["detail"]


async def test_go_cli_exchange(settings, github: GitHubStandIn, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    app = make_app(signin_settings(settings, github=github))
    gh_token = github.token_for(ADA)
    # What the Go CLI's `orz login` sends after GitHub's device flow, and reads back.
    _, resp = await app.asgi_client.post("/v1/auth/exchange", json={
        "github_token": gh_token, "github_id": 4242, "github_login": "ada", "email": "ada@example.com"})
    assert resp.status == 200, resp.json
    assert set(resp.json) == {"token", "user"}
    user = resp.json["user"]
    assert user["login"] == "ada" and user["email"] == "ada@example.com" and user["plan"] == "free"
    assert user["org_id"].startswith("org_") and user["id"].startswith("usr_")
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {resp.json['token']}"})
    assert me.status == 200 and me.json["user"]["id"] == user["id"] and me.json["source"] == "github"

    _, other = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": gh_token, "github_id": 1})
    assert other.status == 400 and other.json["error"] == other.json["detail"]  # the Go CLI prints `error`
    _, bad = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": "gho_forged", "github_id": 4242})
    assert bad.status == 401 and "GitHub does not accept the token" in bad.json["error"]
    for secret in (gh_token, resp.json["token"]):
        assert secret not in caplog.text


@both_databases
async def test_the_go_clis_exchange_takes_only_tokens_this_servers_app_obtained(settings, github: GitHubStandIn,
                                                                                 sessions):
    # Ada once signed in to some other site with GitHub: that site holds a token GitHub's REST API answers
    # to as Ada. It must not sign its holder in here as Ada.
    app = make_app(signin_settings(settings, github=github, github_client_secret=github.client_secret))
    stolen = github.foreign_token_for(ADA)
    _, refused = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": stolen, "github_id": 4242})
    assert refused.status == 400, refused.json
    assert refused.json["code"] == "invalid_grant" and "not issued to this server's GitHub app" in refused.json["error"]
    async with sessions() as db:  # nobody signed in: no user made for the email
        assert await db.scalar(select(User).where(User.email == ADA.email)) is None
    assert stolen not in refused.text
    # The Go CLI's own login (a token of this server's app) still goes through.
    _, ok = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": github.token_for(ADA),
                                                                  "github_id": 4242})
    assert ok.status == 200, ok.json


async def test_github_without_its_client_secret_is_named_at_start(settings, github: GitHubStandIn, caplog):
    # Without the secret GitHub will not say whose app a token is: the exchange takes any app's token.
    caplog.set_level(logging.WARNING)
    for secret, warned in (("", True), (github.client_secret, False)):
        caplog.clear()
        app = make_app(signin_settings(settings, github=github, github_client_secret=secret))
        await app.asgi_client.get("/healthz")  # the app starts (and builds its sign-in service) on the first request
        assert ("GitHub token any other app obtained" in caplog.text) is warned, caplog.text
        assert github.client_secret not in caplog.text


async def test_exchange_without_github_configured(settings):
    app = make_app(settings)
    _, resp = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": "gho_x", "github_id": 1})
    assert resp.status == 404 and resp.json["code"] == "signin_not_configured"


async def test_a_disabled_user_gets_no_token_from_the_go_clis_exchange(settings, github: GitHubStandIn, sessions):
    app = make_app(signin_settings(settings, github=github))
    gh_token = github.token_for(ADA)
    _, first = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": gh_token, "github_id": 4242})
    assert first.status == 200, first.json
    await admin.set_user_active(sessions, "ada@example.com", False)
    _, again = await app.asgi_client.post("/v1/auth/exchange", json={"github_token": gh_token, "github_id": 4242})
    assert again.status == 403 and again.json["error"] == "this account is disabled"
