"""The browser sign-in the web door drives (authorization code + PKCE, RFC 7636; state and nonce, OIDC
Core 3.1): what the API accepts, and every way an attacker's replay, injection or mix-up is refused."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from api.settings import Settings
from tests.signin.conftest import make_app, signin_settings
from tests.signin.standins import OidcStandIn

pytestmark = pytest.mark.usefixtures("default_org")
SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}
CALLBACK = "https://web.example.com/s/callback"


@pytest.fixture
def app(settings: Settings, oidc: OidcStandIn):  # type: ignore[no-untyped-def]
    return make_app(signin_settings(settings, oidc, public_web_url="https://web.example.com"))


async def begin(app):  # type: ignore[no-untyped-def]
    _, resp = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE,
                                         json={"redirect_uri": CALLBACK})
    assert resp.status == 200, resp.json
    return resp.json["authorization_url"], resp.json["state"]


async def finish(app, state: str, code: str, redirect_uri: str = CALLBACK):  # type: ignore[no-untyped-def]
    _, resp = await app.asgi_client.post("/internal/v1/signin/finish", headers=SERVICE,
                                         json={"state": state, "code": code, "redirect_uri": redirect_uri})
    return resp


async def test_code_flow_signs_in_with_state_nonce_and_pkce(app, oidc):
    url, state = await begin(app)
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(f"{oidc.url}/authorize?")
    assert query["state"] == state and query["redirect_uri"] == CALLBACK and query["scope"] == "openid email profile"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43 and query["nonce"]
    code = oidc.authorize(url, email="ada@example.com")
    done = await finish(app, state, code)
    assert done.status == 200, done.json
    assert done.json["refresh_token"] is None and done.json["source"] == "oidc:Test IdP"
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {done.json['access_token']}"})
    assert me.json["user"]["email"] == "ada@example.com"
    # The state is single use: the same callback again (a replay) gets nothing.
    again = await finish(app, state, code)
    assert again.status == 400 and again.json["code"] == "invalid_grant"


async def test_an_unknown_state_is_refused(app, oidc):
    url, _state = await begin(app)
    code = oidc.authorize(url, email="ada@example.com")
    forged = await finish(app, "state-the-attacker-made-up", code)
    assert forged.status == 400 and "state" in forged.json["detail"]


async def test_a_code_injected_from_another_login_fails_pkce(app, oidc):
    url, state = await begin(app)
    # The attacker's own code, obtained with their PKCE challenge, pasted into the victim's callback.
    code = oidc.authorize(url, code_challenge="A" * 43, email="mallory@example.com")
    done = await finish(app, state, code)
    assert done.status == 400 and done.json["code"] == "invalid_grant"


async def test_an_id_token_for_another_login_fails_the_nonce(app, oidc):
    url, state = await begin(app)
    code = oidc.authorize(url, nonce="nonce-of-another-login", email="ada@example.com")
    done = await finish(app, state, code)
    assert done.status == 401 and "nonce" in done.json["detail"]


async def test_a_replayed_code_is_refused_by_the_provider(app, oidc):
    url, state = await begin(app)
    code = oidc.authorize(url, email="ada@example.com")
    assert (await finish(app, state, code)).status == 200
    _, state2 = await begin(app)
    replay = await finish(app, state2, code)  # a used code with a fresh state
    assert replay.status == 400 and replay.json["code"] == "invalid_grant"


async def test_only_the_web_doors_callback_and_only_the_gateway(app):
    _, resp = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE,
                                         json={"redirect_uri": "https://evil.example/s/callback"})
    assert resp.status == 400 and "redirect_uri" in resp.json["detail"]
    _, resp = await app.asgi_client.post("/internal/v1/signin/start", json={"redirect_uri": CALLBACK},
                                         headers={"Authorization": "Bearer orz_not-the-service-token"})
    assert resp.status == 401
    _, state = await begin(app)
    moved = await finish(app, state, "any-code", redirect_uri="https://web.example.com/elsewhere")
    assert moved.status == 400
