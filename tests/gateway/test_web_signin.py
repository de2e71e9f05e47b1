"""The browser terminal signs in with the server's OIDC provider (authorization code + PKCE): a real
`orz server`, its web door, and the stand-in provider (tests/signin/standins.py) over HTTP."""

from __future__ import annotations

import html
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

from tests.gateway.test_web_browser import CHROMIUM, CHROMIUM_ARGS
from tests.signin.standins import OidcStandIn
from tests.web_platform import NEEDS, WebPlatform, start_platform

pytestmark = [pytest.mark.integration, NEEDS]
# A page's sign-in links: (href, text).
LINK = re.compile(r'<a class="signin" data-provider="[a-z]+" href="([^"]+)">([^<]+)</a>')


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


def sign_in(platform: WebPlatform, idp: OidcStandIn, sid: str, email: str) -> tuple[httpx.Client, str]:
    """A browser's sign-in: its cookies, and the key its page learns from the fragment."""
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    start = web.get("/s/login", params={"next": f"/s/{sid}"})
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
    key = back.headers["location"].split("#signin=", 1)[1]
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
    start = attacker.get("/s/login", params={"next": "/s/anything"})
    location = start.headers["location"]
    code = idp.authorize(location, email="admin@localhost")
    state = parse_qs(urlsplit(location).query)["state"][0]
    # Login CSRF: the attacker's callback URL opened in the victim's browser (no state cookie there).
    forced = victim.get("/s/callback", params={"code": code, "state": state})
    assert forced.status_code == 400 and "orz_web" not in set_cookies(forced)
    # And the state the attacker's own browser holds is single use at the API.
    assert attacker.get("/s/callback", params={"code": code, "state": state}).status_code == 302
    replay = attacker.get("/s/callback", params={"code": code, "state": state},
                          headers={"Cookie": f"orz_signin_state={state}"})
    assert replay.status_code == 400 and "already used" in replay.text


def test_sign_in_rules_apply_and_next_stays_on_this_door(platform: WebPlatform, idp: OidcStandIn):
    web = httpx.Client(base_url=platform.web_url, timeout=10)
    assert web.get("/s/login", params={"next": "https://evil.example/"}).status_code == 400
    start = web.get("/s/login", params={"next": "/s/x"})
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
        start = httpx.get(f"{platform.web_url}{html.unescape(links[0][0])}", timeout=10)
        assert start.status_code == 302 and start.headers["location"].startswith(f"{idp.url}/authorize?")
    platform.kill(sid)


class _SessionServer:
    """A session's dev server in local mode: any port of 127.0.0.1, recording the Cookie header of each request."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen: list[tuple[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Cookie", "")))
                body = b"<html><body>dev server</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _SessionServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        with _SessionServer() as dev, sync_playwright() as pw:
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
