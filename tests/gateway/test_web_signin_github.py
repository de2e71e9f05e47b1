"""The browser terminal signs in with GitHub's web flow (a real `orz server` whose only provider is a
stand-in GitHub Enterprise, tests/signin/standins.py), and the web door's sign-in routes share the
API's per-address limit (429 with Retry-After)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.gateway.test_web_signin import LINK, NONCE, fragment_key, set_cookies
from tests.signin.standins import GitHubAccount, GitHubStandIn
from tests.web_platform import NEEDS, WebPlatform, start_platform

pytestmark = [pytest.mark.integration, NEEDS]
LIMIT = 6
# The server's admin (admin@localhost), linked by the verified primary email GitHub lists.
ADMIN = GitHubAccount(id=1, login="admin", email="admin@localhost")


@pytest.fixture(scope="module")
def github() -> Iterator[GitHubStandIn]:
    with GitHubStandIn().serving() as server:
        yield server


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, github: GitHubStandIn) -> Iterator[WebPlatform]:
    for running in start_platform(tmp_path_factory.mktemp("ghsignin"), ORZ_GITHUB_CLIENT_ID=github.client_id,
                                  ORZ_GITHUB_CLIENT_SECRET=github.client_secret, ORZ_GITHUB_BASE_URL=github.url,
                                  ORZ_SIGNIN_NEW_USERS="refuse", ORZ_SIGNIN_RATE_LIMIT=str(LIMIT),
                                  # Both believe X-Forwarded-For from loopback, so a test can be a browser
                                  # at another address behind a proxy.
                                  ORZ_GATEWAY_WEB_TRUSTED_PROXIES="127.0.0.1",
                                  ORZ_API_TRUSTED_PROXIES="127.0.0.1"):
        github.callback_url = f"{running.web_url}/s/callback"  # what the OAuth app registers
        yield running


def test_the_browser_signs_in_with_github_and_gets_attach_tokens(platform: WebPlatform, github: GitHubStandIn):
    sid = platform.new_session("sleep 600")
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    unknown = web.get("/s/login", params={"next": f"/s/{sid}", "provider": "gitlab", "nonce": NONCE})
    assert unknown.status_code == 400 and "oidc, github" in unknown.text
    oidc = web.get("/s/login", params={"next": f"/s/{sid}", "provider": "oidc", "nonce": NONCE})  # not configured here
    assert oidc.status_code == 404 and "not configured" in oidc.text
    # GitHub is this server's only provider: the page links it, by name, and so does a plain /s/login.
    page = web.get(f"/s/{sid}")
    assert LINK.findall(page.text) == [(f"/s/login?next=%2Fs%2F{sid}&amp;provider=github", "Sign in with GitHub")]
    start = web.get("/s/login", params={"next": f"/s/{sid}", "nonce": NONCE})
    assert start.status_code == 302, start.text
    location = start.headers["location"]
    assert location.startswith(f"{github.url}/login/oauth/authorize?")
    state = parse_qs(urlsplit(location).query)["state"][0]
    code = github.authorize(location, ADMIN)
    # Without the state cookie this browser got (another browser, or a forged state): refused.
    forged = httpx.get(f"{platform.web_url}/s/callback", params={"code": code, "state": state}, timeout=10)
    assert forged.status_code == 400 and "orz_web" not in set_cookies(forged)
    back = web.get("/s/callback", params={"code": code, "state": state})
    assert back.status_code == 302 and back.headers["location"].startswith(f"/s/{sid}#signin="), back.text
    key = fragment_key(back, NONCE)
    minted = web.get(f"/s/k/{key}/{sid}/token")
    assert minted.status_code == 200 and minted.json()["token"].count(".") == 2, minted.text
    # The code again (a replayed callback URL with a fresh sign-in's state): GitHub spent it.
    again = web.get("/s/login", params={"next": f"/s/{sid}", "nonce": NONCE})
    fresh = parse_qs(urlsplit(again.headers["location"]).query)["state"][0]
    replay = web.get("/s/callback", params={"code": code, "state": fresh})
    assert replay.status_code == 400 and "GitHub did not accept" in replay.text
    platform.kill(sid)


def test_sign_ins_beyond_the_limit_get_429_with_retry_after(platform: WebPlatform):
    behind_proxy = {"X-Forwarded-For": "203.0.113.5"}  # a browser behind the door's TLS proxy
    web = httpx.Client(base_url=platform.web_url, timeout=10, headers=behind_proxy)
    answers = [web.get("/s/login", params={"next": "/s/x", "nonce": NONCE}) for _ in range(LIMIT + 1)]
    refused = answers[-1]
    assert [a.status_code for a in answers] == [302] * LIMIT + [429]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "too many sign-in attempts" in refused.text
    # Counted for the browser's address, which the door passed on: the API refuses that address on
    # the CLI's routes too, and other addresses (the proxy's own) are not held back.
    with httpx.Client(base_url=platform.api_url, timeout=10) as api:
        device = api.post("/v1/auth/device", json={"provider": "github"}, headers=behind_proxy)
        assert device.status_code == 429 and device.headers["retry-after"]
        assert api.post("/v1/auth/device", json={"provider": "github"}).status_code == 200
    other = httpx.get(f"{platform.web_url}/s/login", params={"next": "/s/x", "nonce": NONCE}, timeout=10)
    assert other.status_code == 302
