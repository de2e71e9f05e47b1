"""A real `orz server` (API, gateway with its web door, LocalProvider runners in tmux) for web-door tests."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fullstack import running_platform
from tests.support import wait_until

NEEDS = pytest.mark.skipif(any(shutil.which(b) is None for b in ("ssh", "tmux", "git")),
                           reason="needs ssh, tmux and git")
ANSI = re.compile(rb"\x1b(\[[0-9;?>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][A-Za-z0-9]|[=>78DEHMcNO])")


def screen_text(data: bytes) -> str:
    """Terminal output with escape sequences removed (good enough to look for words)."""
    return ANSI.sub(b"", data).decode("utf-8", "replace")


@dataclass
class WebPlatform:
    home: Path
    data: Path
    env: dict[str, str]
    api_url: str
    web_url: str  # http://127.0.0.1:<web port>
    ssh_port: int
    api_token: str
    log: Path

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {self.api_token}"},
                            timeout=10)

    def new_session(self, program: str) -> str:
        with self.api() as api:
            resp = api.post("/v1/instances", json={"program": program})
            assert resp.status_code in (200, 201, 202), resp.text
            sid = str(resp.json()["id"])

            def running() -> bool:
                status = api.get(f"/v1/instances/{sid}").json()["status"]
                assert status not in ("failed", "deleted"), status
                return status == "running"

            wait_until(running, timeout=30, interval=0.2, what=f"session {sid} running")
        return sid

    def grant(self, sid: str, *, readonly: bool = False) -> dict[str, object]:
        with self.api() as api:
            resp = api.post(f"/v1/instances/{sid}/attach", json={"readonly": readonly})
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

    def kill(self, sid: str) -> None:
        with self.api() as api:
            api.delete(f"/v1/instances/{sid}", params={"force": "true"})  # cleanup: whatever it holds


def start_platform(base: Path, **settings: str) -> Iterator[WebPlatform]:
    """`orz server` (tests.fullstack) seen through the API and the web door; ``settings``: ORZ_* variables."""
    with running_platform(base, **settings) as platform:
        token_file = platform.home / ".config" / "orzbob" / "token.json"
        token = json.loads(token_file.read_text())["api_token"]
        yield WebPlatform(platform.home, platform.data, platform.env, f"http://127.0.0.1:{platform.api_port}",
                          f"http://127.0.0.1:{platform.web_port}", platform.ssh_port, token, platform.log)


class RecordingServer:
    """An HTTP server on a port of 127.0.0.1 (in local mode a session's dev server is one), recording the path
    and Cookie header of each request (``seen``) and its headers (``headers``)."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen: list[tuple[str, str]] = []
        headers: list[dict[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Cookie", "")))
                headers.append(dict(self.headers.items()))
                body = b"<html><body>dev server</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.seen = seen
        self.headers = headers
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
