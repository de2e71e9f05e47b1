"""Headless Debian chromium, driven by playwright, opens /s/<id>, types `echo ping` and sees `ping`."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, orz
from tests.web_platform import NEEDS, RecordingServer, WebPlatform, start_platform

CHROMIUM = os.environ.get("ORZ_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [
    pytest.mark.integration, NEEDS,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs chromium at {CHROMIUM} (hack/setup.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="needs the playwright package"),
]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebPlatform]:
    yield from start_platform(tmp_path_factory.mktemp("browser"))


def test_browser_terminal_types_and_sees_ping(platform: WebPlatform) -> None:
    from playwright.sync_api import expect, sync_playwright

    sid = platform.new_session("echo hi from $(hostname -s 2>/dev/null || echo orz); exec bash --norc --noprofile")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 520})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{platform.web_url}/s/{sid}")
            # First visit: no API token in this browser yet, so the page asks for one.
            page.fill("#api-token", platform.api_token)
            page.click("#login button[type=submit]")
            # Locators, not wait_for_function: the page's CSP forbids the eval that one relies on.
            expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
            rows = page.locator(".xterm-rows")
            rows.filter(has_text="[main]").wait_for(timeout=15000)
            page.click(".xterm")
            page.keyboard.type("echo ping\n", delay=10)
            rows.locator("div", has_text=re.compile(r"^\s*ping\s*$")).first.wait_for(timeout=15000)
            assert "ping" in rows.inner_text()
            # The page's title follows the agent's state (tmux set-titles through xterm.js).
            expect(page).to_have_title(re.compile(rf"^\[(working|idle|needs input)\] {sid} · Orzbob Cloud$"),
                                       timeout=15000)
            # The API token stays in this browser's storage, never in the URL.
            assert page.evaluate("localStorage.getItem('orz.apiToken')") == platform.api_token
            assert platform.api_token not in page.url
            page.screenshot(path=str(ARTIFACTS / "web-terminal.png"))
            assert not errors, errors
        finally:
            browser.close()
    platform.kill(sid)


def test_one_time_link_and_reconnect_after_a_network_blip(platform: WebPlatform) -> None:
    from playwright.sync_api import expect, sync_playwright

    sid = platform.new_session("bash --norc --noprofile")
    link = orz("cloud", "web", sid, env=platform.env)
    assert link.returncode == 0, link.stderr
    url = link.stdout.strip()
    assert url.startswith(f"{platform.web_url}/s/{sid}#token=")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            page.goto(url)
            expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
            assert "#" not in page.url  # the one-time token left the address bar
            # No API token stored, so after a blip the page can only ask for one: it says so.
            context.set_offline(True)
            expect(page.locator("#status")).not_to_contain_text("connected", timeout=15000)
            context.set_offline(False)
            expect(page.locator("#login")).to_be_visible(timeout=20000)
            # With an API token the page fetches a fresh attach token and is back.
            page.fill("#api-token", platform.api_token)
            page.click("#login button[type=submit]")
            expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
            context.set_offline(True)
            expect(page.locator("#status")).to_contain_text("reconnecting", timeout=15000)
            context.set_offline(False)
            expect(page.locator("#status")).to_contain_text("connected", timeout=20000)
        finally:
            browser.close()
    platform.kill(sid)


def test_the_replay_page_plays_the_sessions_recording(platform: WebPlatform) -> None:
    from playwright.sync_api import expect, sync_playwright

    sid = platform.new_session("bash -c 'echo replayed-in-browser-77; sleep 2.5; echo after-a-pause; sleep infinity'")
    with platform.api() as api:  # the recording holds the later line once the runner uploaded it (every 3 s)
        for _ in range(200):
            got = api.get(f"/v1/instances/{sid}/recording")
            if got.status_code == 200 and "after-a-pause" in got.text:
                break
            time.sleep(0.1)
        assert "after-a-pause" in got.text, got.text
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 520})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{platform.web_url}/s/{sid}/replay")
            page.fill("#api-token", platform.api_token)
            page.click("#login button[type=submit]")
            rows = page.locator(".xterm-rows")
            rows.filter(has_text="replayed-in-browser-77").wait_for(timeout=15000)
            # The 2.5 s pause is played, capped at the page's 2 s idle limit: not there at once.
            assert "after-a-pause" not in rows.inner_text()
            expect(page.locator("#status")).to_contain_text("end of the recording", timeout=15000)
            assert "after-a-pause" in rows.inner_text()
            page.screenshot(path=str(ARTIFACTS / "web-replay.png"))
            assert not errors, errors
            # A token the API refuses: the page says so and asks for another.
            page.evaluate("localStorage.setItem('orz.apiToken', 'orz_not-a-valid-token')")
            page.reload()
            expect(page.locator("#status")).to_contain_text("replay:", timeout=15000)
            expect(page.locator("#login")).to_be_visible(timeout=15000)
        finally:
            browser.close()
    platform.kill(sid)


def test_links_in_the_pane_open_only_http_in_a_tab_that_cannot_reach_the_page(platform: WebPlatform) -> None:
    """A program in the pane can print links (OSC 8) that show other text than where they go: a click opens
    only http(s), in a new tab without the opener (it cannot script the page, which holds the API token) and
    without a Referer; javascript:, data: and file: links open nothing."""
    from playwright.sync_api import expect, sync_playwright

    sid = platform.new_session("exec bash --norc --noprofile")
    with RecordingServer() as landing, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            opened: list[str] = []
            context.on("page", lambda tab: opened.append(tab.url))
            page.goto(f"{platform.web_url}/s/{sid}")
            page.fill("#api-token", platform.api_token)
            page.click("#login button[type=submit]")
            expect(page.locator("#status")).to_contain_text("connected", timeout=15000)
            # A quiet screen first (tmux redraws what it owns on a resize), then the links below its last line.
            page.click(".xterm")
            page.keyboard.type("clear; echo quiet-from-here; sleep 600\n", delay=10)
            quiet = page.locator(".xterm-rows div", has_text=re.compile(r"^\s*quiet-from-here\s*$"))
            quiet.first.wait_for(timeout=15000)
            # The bytes a program's OSC 8 links arrive as (tmux 3.4 and later pass them on; 3.3 drops them),
            # written where the socket's bytes go.
            links = {"JSLINK": "javascript:document.title='owned'", "DATALINK": "data:text/html,<b>hi</b>",
                     "FILELINK": "file:///etc/passwd", "HTTPLINK": f"{landing.url}/landing?from=pane"}
            text = "".join(f"\x1b]8;;{uri}\x1b\\{name}\x1b]8;;\x1b\\\r\n" for name, uri in links.items())
            page.evaluate("(text) => window.orzTerminal.write(text)", text)

            def click(name: str) -> None:
                """A person's click on the link's text (xterm.js's screen layer takes the mouse, not the text)."""
                span = page.locator(".xterm-rows span", has_text=re.compile(rf"^{name}$")).first
                box = None
                for _ in range(100):  # the renderer replaces a row's elements as it redraws it (cursor blink)
                    span.wait_for(timeout=15000)
                    box = span.bounding_box()
                    if box is not None:
                        break
                assert box is not None
                x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.mouse.move(x, y)
                page.mouse.click(x, y)

            for name in ("JSLINK", "DATALINK", "FILELINK"):
                click(name)
            with context.expect_page(timeout=15000) as new_tab:
                click("HTTPLINK")
            tab = new_tab.value
            tab.wait_for_load_state()
            assert tab.url == f"{landing.url}/landing?from=pane"
            assert tab.evaluate("window.opener") is None
            # Only the http link opened anything (a window.open of the others would have come first), no prompt.
            assert len(opened) == 1 and not dialogs, (opened, dialogs)
            pages = [(path, headers) for (path, _), headers in zip(landing.seen, landing.headers, strict=True)
                     if path != "/favicon.ico"]
            assert [path for path, _ in pages] == ["/landing?from=pane"], pages
            assert not {"referer", "Referer"} & set(pages[0][1]), pages
            assert page.title() != "owned" and tab.title() != "owned"
        finally:
            browser.close()
    platform.kill(sid)
