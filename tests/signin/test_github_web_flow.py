"""GitHub's web flow for the browser terminal (authorization code with state and PKCE S256), driven as
the web door drives it (/internal/v1/signin/*) against a stand-in GitHub Enterprise at
ORZ_GITHUB_BASE_URL: the happy path, and the state, replayed code and injected code refused."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pytest

from api.settings import Settings
from tests.signin.conftest import make_app, signin_settings
from tests.signin.standins import GitHubAccount, GitHubStandIn, OidcStandIn

pytestmark = pytest.mark.usefixtures("default_org")
SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}
CALLBACK = "https://web.example.com/s/callback"
ADA = GitHubAccount(id=4242, login="ada", email="ada@example.com", orgs=("acme",))


def github_app(settings: Settings, github: GitHubStandIn, **extra: object):  # type: ignore[no-untyped-def]
    github.callback_url = CALLBACK
    extra.setdefault("github_client_secret", github.client_secret)
    return make_app(signin_settings(settings, github=github, public_web_url="https://web.example.com", **extra))


@pytest.fixture
def app(settings: Settings, github: GitHubStandIn):  # type: ignore[no-untyped-def]
    return github_app(settings, github)


async def begin(app, provider: str | None = None):  # type: ignore[no-untyped-def]
    body = {"redirect_uri": CALLBACK, **({"provider": provider} if provider else {})}
    _, resp = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE, json=body)
    assert resp.status == 200, resp.json
    return resp.json["authorization_url"], resp.json["state"]


async def finish(app, state: str, code: str):  # type: ignore[no-untyped-def]
    _, resp = await app.asgi_client.post("/internal/v1/signin/finish", headers=SERVICE,
                                         json={"state": state, "code": code, "redirect_uri": CALLBACK})
    return resp


def token_requests(github: GitHubStandIn) -> int:
    return github.requests.count(("POST", "/login/oauth/access_token"))


async def test_the_browser_signs_in_with_githubs_web_flow(app, github, caplog):
    caplog.set_level(logging.DEBUG)
    url, state = await begin(app)  # GitHub is the only provider: the default
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    # At the GitHub Enterprise base URL, not github.com.
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{github.url}/login/oauth/authorize"
    assert query["client_id"] == github.client_id and query["redirect_uri"] == CALLBACK
    assert query["state"] == state and query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43 and "read:org" in query["scope"].split()
    code = github.authorize(url, ADA)
    done = await finish(app, state, code)
    assert done.status == 200, done.json
    assert done.json["source"] == "github" and done.json["refresh_token"] is None
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {done.json['access_token']}"})
    assert me.json["user"]["email"] == "ada@example.com" and me.json["source"] == "github"
    for secret in (code, github.client_secret, done.json["access_token"], *github.tokens):
        assert secret not in caplog.text


async def test_a_state_this_server_did_not_issue_is_refused_before_github_is_asked(app, github):
    url, state = await begin(app)
    code = github.authorize(url, ADA)
    forged = await finish(app, "state-the-attacker-made-up", code)
    assert forged.status == 400 and forged.json["code"] == "invalid_grant" and "state" in forged.json["detail"]
    assert token_requests(github) == 0  # the code was not spent
    assert (await finish(app, state, code)).status == 200
    again = await finish(app, state, code)  # the same callback twice: the state is single use
    assert again.status == 400 and "already used" in again.json["detail"]


async def test_a_replayed_code_is_refused(app, github):
    url, state = await begin(app)
    code = github.authorize(url, ADA)
    assert (await finish(app, state, code)).status == 200
    _, fresh_state = await begin(app)
    replay = await finish(app, fresh_state, code)  # a used code with a fresh state
    assert replay.status == 400 and replay.json["code"] == "invalid_grant"
    assert "GitHub did not accept the sign-in code" in replay.json["detail"]


async def test_a_code_injected_from_another_login_fails_pkce(app, github):
    url, state = await begin(app)
    mallory = GitHubAccount(id=666, login="mallory", email="mallory@example.com")
    code = github.authorize(url, mallory, code_challenge="A" * 43)  # obtained for the attacker's own login
    done = await finish(app, state, code)
    assert done.status == 400 and done.json["code"] == "invalid_grant"
    assert not github.tokens  # GitHub handed out no token


async def test_the_sign_in_rules_apply_to_the_web_flow(settings, github):
    app = github_app(settings, github, signin_github_orgs="initech")
    url, state = await begin(app)
    done = await finish(app, state, github.authorize(url, ADA))
    assert done.status == 403 and "members of initech" in done.json["detail"]


async def test_without_the_client_secret_the_web_flow_is_not_offered(settings, github):
    app = github_app(settings, github, github_client_secret="")
    _, resp = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE,
                                         json={"redirect_uri": CALLBACK})
    assert resp.status == 404 and resp.json["code"] == "signin_not_configured"
    assert "ORZ_GITHUB_CLIENT_SECRET" in resp.json["detail"]


async def test_with_oidc_too_the_browser_chooses_github_by_name(settings, github, oidc: OidcStandIn):
    github.callback_url = CALLBACK
    app = make_app(signin_settings(settings, oidc, github, github_client_secret=github.client_secret,
                                   public_web_url="https://web.example.com"))
    default_url, _ = await begin(app)
    assert default_url.startswith(f"{oidc.url}/authorize?")
    url, state = await begin(app, "github")
    assert url.startswith(f"{github.url}/login/oauth/authorize?")
    # The sign-in finishes at the provider that started it, whatever the other one would say.
    done = await finish(app, state, github.authorize(url, ADA))
    assert done.status == 200 and done.json["source"] == "github"
