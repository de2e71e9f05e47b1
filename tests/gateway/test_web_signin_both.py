"""A server with an OIDC issuer and a GitHub app both configured: the browser pages link each by name, and
each link signs the browser in with its own provider (a real `orz server`, its web door, and the stand-in
providers of tests/signin/standins.py over HTTP)."""

from __future__ import annotations

import html
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.gateway.test_web_signin import LINK, NONCE, fragment_key
from tests.gateway.test_web_signin_github import ADMIN
from tests.signin.standins import GitHubStandIn, OidcStandIn
from tests.web_platform import NEEDS, WebPlatform, start_platform

pytestmark = [pytest.mark.integration, NEEDS]


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcStandIn]:
    with OidcStandIn().serving() as server:
        yield server


@pytest.fixture(scope="module")
def github() -> Iterator[GitHubStandIn]:
    with GitHubStandIn().serving() as server:
        yield server


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, idp: OidcStandIn,
             github: GitHubStandIn) -> Iterator[WebPlatform]:
    for running in start_platform(tmp_path_factory.mktemp("bothsignin"), ORZ_OIDC_ISSUER=idp.url,
                                  ORZ_OIDC_CLIENT_ID=idp.client_id, ORZ_OIDC_CLIENT_SECRET=idp.client_secret,
                                  ORZ_OIDC_NAME="Keycloak", ORZ_GITHUB_CLIENT_ID=github.client_id,
                                  ORZ_GITHUB_CLIENT_SECRET=github.client_secret, ORZ_GITHUB_BASE_URL=github.url,
                                  ORZ_SIGNIN_NEW_USERS="refuse"):
        github.callback_url = f"{running.web_url}/s/callback"
        yield running


def links(web: httpx.Client, path: str) -> dict[str, str]:
    """The page's sign-in links: text -> href (unescaped, as the browser follows it)."""
    page = web.get(path)
    assert page.status_code == 200, page.text
    return {text: html.unescape(href) for href, text in LINK.findall(page.text)}


def test_each_provider_has_its_link_and_each_signs_in_with_its_own(
        platform: WebPlatform, idp: OidcStandIn, github: GitHubStandIn) -> None:
    sid = platform.new_session("sleep 600")
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    offered = links(web, f"/s/{sid}")
    assert list(offered) == ["Sign in with Keycloak", "Sign in with GitHub"]

    # GitHub's link goes to GitHub (a plain /s/login would go to the OIDC issuer), and back to the page.
    start = web.get(f"{offered['Sign in with GitHub']}&nonce={NONCE}")  # as the page's script adds it
    assert start.status_code == 302 and start.headers["location"].startswith(f"{github.url}/login/oauth/authorize?")
    code = github.authorize(start.headers["location"], ADMIN)
    state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    back = web.get("/s/callback", params={"code": code, "state": state})
    assert back.status_code == 302 and back.headers["location"].startswith(f"/s/{sid}#signin="), back.text
    key = fragment_key(back, NONCE)
    minted = web.get(f"/s/k/{key}/{sid}/token")
    assert minted.status_code == 200 and minted.json()["token"].count(".") == 2, minted.text

    # The replay page's links come back to the replay page.
    other = httpx.Client(base_url=platform.web_url, timeout=10)
    replay_links = links(other, f"/s/{sid}/replay")
    assert list(replay_links) == ["Sign in with Keycloak", "Sign in with GitHub"]
    start = other.get(f"{replay_links['Sign in with Keycloak']}&nonce={NONCE}")
    assert start.status_code == 302 and start.headers["location"].startswith(f"{idp.url}/authorize?")
    code = idp.authorize(start.headers["location"], email="admin@localhost")
    state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    back = other.get("/s/callback", params={"code": code, "state": state})
    assert back.status_code == 302 and back.headers["location"].startswith(f"/s/{sid}/replay#signin="), back.text
    # Anywhere else is still refused as a place to come back to.
    assert other.get("/s/login", params={"next": f"/s/{sid}/token", "nonce": NONCE}).status_code == 400
    platform.kill(sid)
