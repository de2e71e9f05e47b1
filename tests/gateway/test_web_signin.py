"""The browser terminal signs in with the server's OIDC provider (authorization code + PKCE): a real
`orz server`, its web door, and the stand-in provider (tests/signin/standins.py) over HTTP."""

from __future__ import annotations

import contextlib
import html
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

from tests.gateway.test_web_browser import CHROMIUM, CHROMIUM_ARGS
from tests.signin.standins import OidcStandIn
from tests.web_platform import NEEDS, RecordingServer, WebPlatform, start_platform

pytestmark = [pytest.mark.integration, NEEDS]
# A page's sign-in links: (href, text).
LINK = re.compile(r'<a class="signin" data-provider="[a-z]+" href="([^"]+)">([^<]+)</a>')
# What the page's script adds to its sign-in link (gateway/static/door.js) and keeps in its localStorage.
NONCE = "pAgEnOnCe-made-by-the-door-page_"


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcStandIn]:
    with OidcStandIn().serving() as server:
        yield server


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, idp: OidcStandIn) -> Iterator[WebPlatform]:
    yield from start_platform(tmp_path_factory.mktemp("signin"), ORZ_OIDC_ISSUER=idp.url,
                              ORZ_OIDC_CLIENT_ID=idp.client_id, ORZ_OIDC_CLIENT_SECRET=idp.client_secret,
                              ORZ_SIGNIN_NEW_USERS="refuse")


def set_cookies(resp: httpx.Response) -> dict[str, str]:
    """Each Set-Cookie line by cookie name (the whole line, attributes included)."""
    return {line.split("=", 1)[0]: line for line in resp.headers.get_list("set-cookie")}


def fragment_key(back: httpx.Response, nonce: str) -> str:
    """The sign-in key in the callback's redirect, which carries the page's nonce beside it."""
    fragment = parse_qs(urlsplit(back.headers["location"]).fragment)
    assert fragment["nonce"] == [nonce], fragment
    return fragment["signin"][0]


def sign_in(platform: WebPlatform, idp: OidcStandIn, sid: str, email: str) -> tuple[httpx.Client, str]:
    """A browser's sign-in: its cookies, and the key its page learns from the fragment."""
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    start = web.get("/s/login", params={"next": f"/s/{sid}", "nonce": NONCE})
    assert start.status_code == 302, start.text
    location = start.headers["location"]
    assert location.startswith(f"{idp.url}/authorize?")
    state_line = set_cookies(start)["orz_signin_state"]
    assert "HttpOnly" in state_line and "SameSite=Lax" in state_line and "Path=/s/callback" in state_line
    code = idp.authorize(location, email=email)
    state = parse_qs(urlsplit(location).query)["state"][0]
    back = web.get("/s/callback", params={"code": code, "state": state})
    assert back.status_code == 302, back.text
    assert back.headers["location"].startswith(f"/s/{sid}#signin=")
    key = fragment_key(back, NONCE)
    session_line = next(line for line in back.headers.get_list("set-cookie") if "Max-Age=0" not in line
                    and line.startswith("orz_web="))
    assert "HttpOnly" in session_line and "SameSite=Strict" in session_line and f"Path=/s/k/{key};" in session_line
    return web, key


def test_the_browser_signs_in_and_gets_attach_tokens_with_its_cookie(platform: WebPlatform, idp: OidcStandIn):
    sid = platform.new_session("sleep 600")
    web, key = sign_in(platform, idp, sid, "admin@localhost")  # the server's admin, linked by verified email
    assert web.cookies.get("orz_web", path=f"/s/k/{key}")
    minted = web.get(f"/s/k/{key}/{sid}/token")
    assert minted.status_code == 200, minted.text
    assert minted.json()["token"].count(".") == 2  # an attach JWT
    # Without the key (what a form or image on another site, or another port of this host, could send): the
    # browser sends no cookie there, and even a cookie sent along is not taken.
    cookie = {"Cookie": f"orz_web={web.cookies.get('orz_web', path=f'/s/k/{key}')}"}
    assert web.get(f"/s/{sid}/token", headers=cookie).status_code == 401
    guess = "A" * 32
    assert web.get(f"/s/k/{guess}/{sid}/token", headers=cookie).status_code == 401
    # A cookie planted on the wide /s path beside the real one does not replace it.
    planted = {"Cookie": f"orz_web={guess}.orz_planted; {cookie['Cookie'].removeprefix('Cookie: ')}"}
    assert web.get(f"/s/k/{key}/{sid}/token", headers=planted).status_code == 200
    # Another site's script: the door's Origin check refuses it first.
    assert web.get(f"/s/k/{key}/{sid}/token", headers={"Origin": "https://evil.example"}).status_code == 403
    platform.kill(sid)


def test_a_sign_in_cookie_from_before_the_keyed_path_goes_at_the_first_page(platform: WebPlatform):
    """A browser signed in before the keyed path holds its API token in orz_web on /s, which every port of
    this host receives (a session's dev server too). The first terminal or replay page it opens removes it,
    not only its next sign-in; a keyed cookie (which the browser sends only to /s/k/<key>/) is left alone."""
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    legacy = {"Cookie": "orz_web=orz_ABCDEFGHijklmnopqrstuvwxyz; orz_csrf=abc"}
    for path in ("/s/some-session", "/s/some-session/replay"):
        page = web.get(path, headers=legacy)
        assert page.status_code == 200
        removed = set_cookies(page)
        for name in ("orz_web", "orz_csrf"):
            assert "Max-Age=0" in removed[name] and "Path=/s;" in removed[name], removed
    keyed = {"Cookie": f"orz_web={'A' * 32}.orz_ABCDEFGHijklmnopqrstuvwxyz"}
    assert not set_cookies(web.get("/s/some-session", headers=keyed))
    assert not set_cookies(web.get("/s/some-session"))


def test_a_callback_this_browser_did_not_start_is_refused(platform: WebPlatform, idp: OidcStandIn):
    victim = httpx.Client(base_url=platform.web_url, timeout=10)
    attacker = httpx.Client(base_url=platform.web_url, timeout=10)
    start = attacker.get("/s/login", params={"next": "/s/anything", "nonce": NONCE})
    location = start.headers["location"]
    code = idp.authorize(location, email="admin@localhost")
    state = parse_qs(urlsplit(location).query)["state"][0]
    # Login CSRF: the attacker's callback URL opened in the victim's browser (no state cookie there).
    forced = victim.get("/s/callback", params={"code": code, "state": state})
    assert forced.status_code == 400 and "orz_web" not in set_cookies(forced)
    # And the state the attacker's own browser holds is single use at the API.
    assert attacker.get("/s/callback", params={"code": code, "state": state}).status_code == 302
    replay = attacker.get("/s/callback", params={"code": code, "state": state},
                          headers={"Cookie": f"orz_signin_state={state}; orz_signin_next=/s/anything"})
    assert replay.status_code == 400 and "already used" in replay.text


def test_sign_in_rules_apply_and_next_stays_on_this_door(platform: WebPlatform, idp: OidcStandIn):
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    assert web.get("/s/login", params={"next": "https://evil.example/", "nonce": NONCE}).status_code == 400
    # A start without the page's nonce (a link of its own, not the page's): no key of it would be taken.
    bare = web.get("/s/login", params={"next": "/s/x"})
    assert bare.status_code == 400 and "from the session's page" in bare.text and not set_cookies(bare)
    start = web.get("/s/login", params={"next": "/s/x", "nonce": NONCE})
    location = start.headers["location"]
    code = idp.authorize(location, email="stranger@example.com")  # ORZ_SIGNIN_NEW_USERS=refuse
    state = parse_qs(urlsplit(location).query)["state"][0]
    refused = web.get("/s/callback", params={"code": code, "state": state})
    assert refused.status_code == 403 and "ask an admin" in refused.text
    assert "orz_web" not in set_cookies(refused)


def test_a_real_browser_signs_in_and_the_terminal_connects(platform: WebPlatform, idp: OidcStandIn):
    """Headless chromium: the page offers Sign in, the provider sends it back, the terminal connects with
    the cookie, and no script on the page can read the API token."""
    chromium = Path(CHROMIUM)
    if not chromium.exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip("needs chromium and playwright (hack/setup.sh)")
    from playwright.sync_api import expect, sync_playwright

    sid = platform.new_session("exec bash --norc --noprofile")
    idp.browser_email = "admin@localhost"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{platform.web_url}/s/{sid}")
                expect(page.locator("#status")).to_contain_text("sign in", timeout=15000)
                page.click("a.signin[data-provider=oidc]")
                page.wait_for_url(f"{platform.web_url}/s/{sid}*", timeout=15000)
                expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
                assert "orz_web" not in page.evaluate("document.cookie")  # HttpOnly
                assert page.url == f"{platform.web_url}/s/{sid}"  # the key left the address bar
                assert page.evaluate("localStorage.getItem('orz.apiToken')") is None
                assert not errors, errors
            finally:
                browser.close()
    finally:
        idp.browser_email = None
        platform.kill(sid)


def test_the_pages_link_the_one_provider_configured(platform: WebPlatform, idp: OidcStandIn):
    sid = platform.new_session("sleep 600")
    for path in (f"/s/{sid}", f"/s/{sid}/replay"):
        page = httpx.get(f"{platform.web_url}{path}", timeout=10)
        assert page.status_code == 200
        links = LINK.findall(page.text)
        assert links == [(f"/s/login?next={quote(path, safe='')}&amp;provider=oidc", "Sign in with OIDC")], links
        start = httpx.get(f"{platform.web_url}{html.unescape(links[0][0])}&nonce={NONCE}", timeout=10)
        assert start.status_code == 302 and start.headers["location"].startswith(f"{idp.url}/authorize?")
    platform.kill(sid)


def test_a_session_dev_server_on_another_port_never_receives_the_sign_in(platform: WebPlatform, idp: OidcStandIn):
    """Cookies ignore ports: in local mode a session's dev server is on the door's host (127.0.0.1). After a
    real browser signs in, visiting every path the session could link it to sends that server no credential."""
    chromium = Path(CHROMIUM)
    if not chromium.exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip("needs chromium and playwright (hack/setup.sh)")
    from playwright.sync_api import expect, sync_playwright

    assert urlsplit(platform.web_url).hostname == "127.0.0.1"
    sid = platform.new_session("exec bash --norc --noprofile")
    idp.browser_email = "admin@localhost"
    try:
        with RecordingServer() as dev, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.goto(f"{platform.web_url}/s/{sid}")
                expect(page.locator("#status")).to_contain_text("sign in", timeout=15000)
                page.click("a.signin[data-provider=oidc]")
                page.wait_for_url(f"{platform.web_url}/s/{sid}*", timeout=15000)
                expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
                for path in ("/", "/s", f"/s/{sid}", f"/s/{sid}/token", f"/s/{sid}/recording", "/s/callback",
                             "/s/k/x/y/token"):
                    page.goto(f"{dev.url}{path}")
                # And the session's own page, once open, fetching its own /s paths with credentials.
                page.evaluate(f"fetch('/s/{sid}/token', {{credentials: 'include'}})")
                page.goto(f"{dev.url}/s/done")
            finally:
                browser.close()
        assert len(dev.seen) >= 9, dev.seen
        leaked = [(path, cookie) for path, cookie in dev.seen if "orz_web" in cookie or "orz_csrf" in cookie]
        assert not leaked, leaked
    finally:
        idp.browser_email = None
        platform.kill(sid)


def test_a_callback_that_lost_its_way_back_says_start_again(platform: WebPlatform, idp: OidcStandIn):
    """Without the cookie naming the page to go back to, no page would learn the sign-in's key: the callback
    redeems nothing, sets no cookie, and says to start again from the session's page."""
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    start = web.get("/s/login", params={"next": "/s/x", "nonce": NONCE})
    location = start.headers["location"]
    code = idp.authorize(location, email="admin@localhost")
    state = parse_qs(urlsplit(location).query)["state"][0]
    web.cookies.delete("orz_signin_next")
    back = web.get("/s/callback", params={"code": code, "state": state})
    assert back.status_code == 400 and "sign in again" in back.text, back.text
    cleared = set_cookies(back)
    assert "orz_web" not in cleared and "Max-Age=0" in cleared["orz_signin_state"], cleared
    assert not idp.codes[code]["used"]  # the provider was not asked to redeem it


@contextlib.contextmanager
def signed_in_page(platform: WebPlatform, idp: OidcStandIn, sid: str) -> Iterator[tuple[Any, Any]]:
    """Headless chromium signed in through the page's own link, its terminal connected: (context, page)."""
    if not Path(CHROMIUM).exists() or importlib.util.find_spec("playwright") is None:
        pytest.skip("needs chromium and playwright (hack/setup.sh)")
    from playwright.sync_api import expect, sync_playwright

    idp.browser_email = "admin@localhost"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{platform.web_url}/s/{sid}")
                expect(page.locator("#status")).to_contain_text("sign in", timeout=15000)
                page.click("a.signin[data-provider=oidc]")
                page.wait_for_url(f"{platform.web_url}/s/{sid}*", timeout=15000)
                expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
                yield context, page
            finally:
                browser.close()
    finally:
        idp.browser_email = None


def test_a_sign_in_link_this_browser_did_not_start_is_ignored(platform: WebPlatform, idp: OidcStandIn):
    """Login CSRF in local mode: another port of this host (a session's dev server) can plant cookies in the
    browser, which ignore ports: a key's cookie holding the attacker's API token, or the state and next cookies
    of the attacker's own sign-in. Then a link to the page with the attacker's key in the fragment, or to the
    callback of the attacker's sign-in, must not sign the page in as the attacker: the page takes a key only
    with the nonce it kept when it started its own sign-in, which no other port can read."""
    from playwright.sync_api import expect

    sid = platform.new_session("exec bash --norc --noprofile")
    attacker, attacker_key = sign_in(platform, idp, sid, "admin@localhost")
    attacker_cookie = attacker.cookies.get("orz_web", path=f"/s/k/{attacker_key}")
    # The attacker's second sign-in, started but not finished: its callback URL and cookies.
    other = httpx.Client(base_url=platform.web_url, timeout=10)
    start = other.get("/s/login", params={"next": f"/s/{sid}", "nonce": NONCE})
    code = idp.authorize(start.headers["location"], email="admin@localhost")
    state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    try:
        with signed_in_page(platform, idp, sid) as (context, page):
            mine = page.evaluate("localStorage.getItem('orz.signinKey')")
            assert mine and mine != attacker_key
            planted = [{"name": "orz_web", "value": attacker_cookie, "domain": "127.0.0.1",
                        "path": f"/s/k/{attacker_key}"}]
            planted += [{"name": name, "value": other.cookies.get(name, path="/s/callback") or "",
                         "domain": "127.0.0.1", "path": "/s/callback"}
                        for name in ("orz_signin_state", "orz_signin_next")]
            context.add_cookies(planted)
            for link in (f"/s/{sid}#signin={attacker_key}", f"/s/{sid}#signin={attacker_key}&nonce={NONCE}",
                         f"/s/callback?code={code}&state={state}"):
                page.goto("about:blank")
                page.goto(f"{platform.web_url}{link}")
                page.wait_for_url(f"{platform.web_url}/s/{sid}", timeout=15000)
                assert page.evaluate("localStorage.getItem('orz.signinKey')") == mine, link
                expect(page.locator("#status")).to_contain_text("did not start was ignored", timeout=15000)
            # The callback did run the attacker's sign-in (its cookies were there), and the page still ignored it.
            assert idp.codes[code]["used"]
            expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
    finally:
        platform.kill(sid)


def test_forget_revokes_the_sign_in_and_clears_its_cookie(platform: WebPlatform, idp: OidcStandIn):
    """The page's Forget removes what script can (localStorage) and asks the door for the rest: the HttpOnly
    cookie goes (the door's answer clears it) and its API token is revoked at the API."""
    from playwright.sync_api import expect

    sid = platform.new_session("exec bash --norc --noprofile")
    try:
        with signed_in_page(platform, idp, sid) as (context, page):
            key = page.evaluate("localStorage.getItem('orz.signinKey')")
            cookie = next(c["value"] for c in context.cookies() if c["name"] == "orz_web")
            assert web_token(platform, key, sid, cookie).status_code == 200
            page.click("#forget")
            expect(page.locator("#status")).to_contain_text("signed out: the sign-in is revoked", timeout=15000)
            assert [c for c in context.cookies() if c["name"] == "orz_web"] == []
            assert page.evaluate("localStorage.getItem('orz.signinKey')") is None
        # A copy of the cookie taken before (what another port could have kept) no longer works either.
        assert web_token(platform, key, sid, cookie).status_code == 401
    finally:
        platform.kill(sid)


def web_token(platform: WebPlatform, key: str, sid: str, cookie: str) -> httpx.Response:
    return httpx.get(f"{platform.web_url}/s/k/{key}/{sid}/token", headers={"Cookie": f"orz_web={cookie}"},
                     timeout=10)
