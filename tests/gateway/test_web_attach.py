"""The web door, full stack: `orz server` with a LocalProvider runner in tmux, driven by a WebSocket client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pexpect
import pytest
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.typing import Subprotocol

from api.credentials import jwt as attach_jwt
from tests.support import orz, wait_until
from tests.web_platform import NEEDS, WebPlatform, screen_text, start_platform

pytestmark = [pytest.mark.integration, NEEDS]
PROGRAM = "echo hi; exec bash --norc --noprofile"
PAGE = [Subprotocol("orz.terminal.v1")]  # what the browser page asks for: the JSON control messages


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebPlatform]:
    yield from start_platform(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def sid(platform: WebPlatform) -> str:
    return platform.new_session(PROGRAM)


def ws_url(platform: WebPlatform, sid: str, token: str, kind: str = "attach", **query: object) -> str:
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return f"{platform.web_url.replace('http', 'ws', 1)}/v1/instances/{sid}/{kind}?token={token}{extra}"


class Screen:
    """Everything one WebSocket client received: terminal bytes and control messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.data = b""
        self.control: list[dict[str, object]] = []

    async def until(self, word: str, timeout: float = 15) -> str:
        async with asyncio.timeout(timeout):
            while word not in screen_text(self.data):
                msg = await self.ws.recv()
                if isinstance(msg, bytes):
                    self.data += msg
                else:
                    self.control.append(json.loads(msg))
        return screen_text(self.data)

    async def drain(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                while True:
                    msg = await self.ws.recv()
                    if isinstance(msg, bytes):
                        self.data += msg
        except TimeoutError:
            pass

    async def type(self, text: str) -> None:
        await self.ws.send(text.encode())


async def status_of(url: str, **kw: object) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=10, **kw):  # type: ignore[arg-type]
            pass
    return info.value.response.status_code


def signing_key(platform: WebPlatform):  # type: ignore[no-untyped-def]
    return serialization.load_pem_private_key((platform.data / "keys" / "jwt_es256.pem").read_bytes(), None)


async def test_attach_sees_hi_types_and_the_token_is_single_use(platform: WebPlatform, sid: str) -> None:
    token = str(platform.grant(sid)["token"])
    async with connect(ws_url(platform, sid, token, cols=80, rows=24), open_timeout=10, subprotocols=PAGE) as ws:
        screen = Screen(ws)
        await screen.until("hi")
        await screen.until("[main]")  # tmux drew its status line: keys now reach the shell
        await screen.type("echo pi''ng-web\r")
        await screen.until("ping-web")
        assert {"type": "attached", "mode": "rw"} in screen.control
    assert await status_of(ws_url(platform, sid, token)) == 401  # replayed jti
    # Attach and detach reached the API like an SSH client's.
    with platform.api() as api:
        def reported() -> bool:
            kinds = [e["kind"] for e in api.get(f"/v1/instances/{sid}/status").json()["events"]]
            return "attached" in kinds and "detached" in kinds
        wait_until(reported, timeout=5, what="attach events")


async def test_expired_forged_missing_and_foreign_tokens(platform: WebPlatform, sid: str) -> None:
    key = signing_key(platform)
    user = str(platform.grant(sid)["user"])
    expired = attach_jwt.issue(key, user_id=user, session_id=sid, ttl_s=120, now=time.time() - 300).token
    assert await status_of(ws_url(platform, sid, expired)) == 401
    assert await status_of(ws_url(platform, sid, "not-a-jwt")) == 401
    assert await status_of(ws_url(platform, sid, "")) == 401
    other = attach_jwt.issue(key, user_id=user, session_id="s-someone-else", ttl_s=120).token
    assert await status_of(ws_url(platform, sid, other)) == 403
    # The gateway's own SSH listener is not reachable without a token either.
    assert await status_of(ws_url(platform, sid, "", kind="ssh")) == 401
    # A page on another site cannot drive a browser into the door.
    fresh = str(platform.grant(sid)["token"])
    assert await status_of(ws_url(platform, sid, fresh), origin="https://evil.example") == 403
    # Refused before the API was asked, so the token is still good.
    async with connect(ws_url(platform, sid, fresh), open_timeout=10, origin=platform.web_url) as ws:
        await Screen(ws).until("[main]")


async def test_resize_frame_resizes_the_tmux_window(platform: WebPlatform, sid: str) -> None:
    token = str(platform.grant(sid)["token"])
    async with connect(ws_url(platform, sid, token, cols=80, rows=24), open_timeout=10) as ws:
        screen = Screen(ws)
        await screen.until("[main]")
        await ws.send(json.dumps({"type": "resize", "cols": 101, "rows": 31}))
        await asyncio.sleep(0.3)
        await screen.type("tmux display -p 'W#{window_width}''x#{window_height}'\r")
        await screen.until("W101x30")  # 31 rows, one of them tmux's status line


async def test_readonly_cannot_type_but_sees_the_shared_session(platform: WebPlatform, sid: str) -> None:
    ro_token = str(platform.grant(sid, readonly=True)["token"])
    rw_token = str(platform.grant(sid)["token"])
    async with connect(ws_url(platform, sid, ro_token), open_timeout=10, subprotocols=PAGE) as ro_ws, \
            connect(ws_url(platform, sid, rw_token), open_timeout=10) as rw_ws:
        ro, rw = Screen(ro_ws), Screen(rw_ws)
        await ro.until("[main]")
        await rw.until("[main]")
        assert {"type": "attached", "mode": "ro"} in ro.control
        await ro.type("echo ro''-typed\r")
        await asyncio.sleep(0.5)
        await rw.type("echo rw''-typed\r")
        await ro.until("rw-typed")  # one tmux session: the watcher sees the writer
        await rw.until("rw-typed")
        await rw.drain(0.3)
        assert "ro-typed" not in screen_text(rw.data)


def test_page_and_static_files_are_served(platform: WebPlatform, sid: str) -> None:
    page = httpx.get(f"{platform.web_url}/s/{sid}", timeout=5)
    assert page.status_code == 200 and "xterm.js" in page.text and sid in page.text
    # No identity provider configured here: no sign-in link, the API token field only.
    assert "/s/login" not in page.text and 'id="api-token"' in page.text
    replay = httpx.get(f"{platform.web_url}/s/{sid}/replay", timeout=5)
    assert replay.status_code == 200 and "/s/login" not in replay.text and 'id="api-token"' in replay.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    js = httpx.get(f"{platform.web_url}/static/vendor/xterm/xterm.js", timeout=5)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{platform.web_url}/static/../web.py", timeout=5).status_code == 404
    minted = httpx.get(f"{platform.web_url}/s/{sid}/token", timeout=10,
                       headers={"Authorization": f"Bearer {platform.api_token}"})
    assert minted.status_code == 200 and minted.json()["token"].count(".") == 2
    refused = httpx.get(f"{platform.web_url}/s/{sid}/token", timeout=10, headers={"Authorization": "Bearer orz_bad"})
    assert refused.status_code == 401


def test_no_token_in_the_server_log(platform: WebPlatform, sid: str) -> None:
    token = str(platform.grant(sid)["token"])
    log = Path(platform.log)
    before = log.stat().st_size  # earlier requests logged this session's paths already
    assert asyncio.run(status_of(ws_url(platform, sid, token[:-4] + "AAAA"))) == 401

    def refused_attach_logged() -> str:
        new = log.read_bytes()[before:].decode("utf-8", "replace")
        return new if f"/v1/instances/{sid}/attach" in new else ""

    new = str(wait_until(refused_attach_logged, timeout=5, what="the refused WebSocket attach in the log"))
    assert "token=" not in new  # the path is logged, its query string is not
    assert token[:-4] not in log.read_text()


async def test_browser_and_ssh_client_share_one_tmux_session(platform: WebPlatform, sid: str) -> None:
    got = orz("cloud", "_refresh-cert", sid, env=platform.env)
    assert got.returncode == 0, got.stderr
    conf = platform.home / ".config" / "orzbob"
    token = str(platform.grant(sid)["token"])
    async with connect(ws_url(platform, sid, token), open_timeout=10) as ws:
        screen = Screen(ws)
        await screen.until("[main]")
        child = pexpect.spawn("ssh", [
            "-F", "/dev/null", "-p", str(platform.ssh_port), "-i", str(conf / "id_ed25519"),
            "-o", f"CertificateFile={conf / 'certs' / (sid + '-cert.pub')}", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={platform.home / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=accept-new", "-t", f"{sid}@127.0.0.1"],
            env=platform.env, encoding="utf-8", timeout=15, dimensions=(24, 80))
        try:
            child.expect(r"\[main\]")
            await asyncio.sleep(0.3)
            child.sendline("echo from''-ssh")
            await screen.until("from-ssh")  # typed over SSH, seen in the browser's stream
            await screen.type("echo from''-web\r")
            child.expect("from-web")  # and the other way round
            child.send("\x02d")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)


async def test_a_stopped_session_wakes_with_status_messages(platform: WebPlatform) -> None:
    sid = platform.new_session(PROGRAM)
    with platform.api() as api:
        assert api.post(f"/v1/instances/{sid}/stop").status_code in (200, 202)
        wait_until(lambda: api.get(f"/v1/instances/{sid}").json()["status"] == "stopped", timeout=20,
                   what="stopped")
    token = str(platform.grant(sid)["token"])
    async with connect(ws_url(platform, sid, token), open_timeout=10, subprotocols=PAGE) as ws:
        screen = Screen(ws)
        await screen.until("[main]", timeout=30)
        statuses = [m for m in screen.control if m.get("type") == "status"]
        assert statuses, screen.control
        assert screen.control[-1] == {"type": "attached", "mode": "rw"}
    platform.kill(sid)


async def test_the_page_reads_why_the_api_refused_instead_of_retrying_forever(platform: WebPlatform) -> None:
    """A browser cannot read the body of a refused WebSocket handshake: with the API's refusal as an HTTP
    status the page saw "connection lost" and reconnected every 15 s, never saying why (a plan at its
    quota, a session that is gone). The page (its subprotocol) now gets the reason and close code 4001,
    on which it stops; other clients still get the HTTP status and its `orz:` line."""
    gone = platform.new_session(PROGRAM)
    page_token, other_token = str(platform.grant(gone)["token"]), str(platform.grant(gone)["token"])
    platform.kill(gone)
    with platform.api() as api:  # gone for good, and its quota slot free for the tests after this one
        wait_until(lambda: api.get(f"/v1/instances/{gone}").status_code == 404, timeout=20, what="deleted")
    messages: list[str | bytes] = []
    async with connect(ws_url(platform, gone, page_token), open_timeout=10, subprotocols=PAGE) as ws:
        with pytest.raises(ConnectionClosedError):
            while True:
                messages.append(await ws.recv())
        assert ws.close_code == 4001 and "no such session" in str(ws.close_reason)
    errors = [json.loads(m) for m in messages if isinstance(m, str)]
    assert errors and errors[0]["type"] == "error" and "no such session" in errors[0]["message"]
    assert await status_of(ws_url(platform, gone, other_token)) == 404


def go_client_url(attach_url: str) -> str:
    """What the Go CLI does with a session's attach_url: take `token`, http(s) -> ws(s), re-add `?token=`."""
    parts = urlsplit(attach_url)
    token = parse_qs(parts.query)["token"][0]
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path, "", "")) + f"?token={token}"


async def test_the_go_cli_attaches_with_the_session_objects_attach_url(platform: WebPlatform) -> None:
    with platform.api() as api:
        created = api.post("/v1/instances", json={"program": PROGRAM})
        assert created.status_code == 201, created.text
        body = created.json()
        sid = body["id"]
        assert body["attach_url"].startswith(f"{platform.web_url}/v1/instances/{sid}/attach?token=")
        # Like the Go CLI: no subprotocol, no Origin, no cols/rows, raw keystrokes in binary frames, and
        # every frame it gets written to the terminal as it is. The session is still starting.
        async with connect(go_client_url(body["attach_url"]), open_timeout=10) as ws:
            screen = Screen(ws)
            await screen.until("[main]", timeout=30)
            await screen.type("echo pi''ng-go\r")
            await screen.until("ping-go")
            assert screen.control == []  # no JSON in the Go user's terminal
        assert await status_of(go_client_url(body["attach_url"])) == 401  # the token worked once
        again = api.get(f"/v1/instances/{sid}").json()["attach_url"]  # `attach <id>` asks for the session
        assert again != body["attach_url"]
        async with connect(go_client_url(again), open_timeout=10) as ws:
            await Screen(ws).until("[main]")
    platform.kill(sid)


async def test_a_go_cli_waking_a_stopped_session_sees_progress_as_terminal_lines(platform: WebPlatform) -> None:
    sid = platform.new_session(PROGRAM)
    with platform.api() as api:
        assert api.post(f"/v1/instances/{sid}/stop").status_code in (200, 202)
        wait_until(lambda: api.get(f"/v1/instances/{sid}").json()["status"] == "stopped", timeout=20,
                   what="stopped")
        url = go_client_url(api.get(f"/v1/instances/{sid}").json()["attach_url"])
    async with connect(url, open_timeout=10) as ws:
        screen = Screen(ws)
        await screen.until("[main]", timeout=30)
        assert screen.control == []
        assert b"orz: " in screen.data  # the wake's progress, as lines the Go CLI prints as they come
    platform.kill(sid)
