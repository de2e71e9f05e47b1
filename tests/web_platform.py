"""A real `orz server` (API, gateway with its web door, LocalProvider runners in tmux) for web-door tests."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port, orz_env, wait_until

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
            api.delete(f"/v1/instances/{sid}")


def start_platform(base: Path) -> Iterator[WebPlatform]:
    home, data = base / "home", base / "data"
    home.mkdir()
    api_port, ssh_port, web_port = free_port(), free_port(), free_port()
    env = orz_env(home, ORZ_PROVIDER="local", ORZ_LOG_JSON="true", TERM="xterm")
    log = base / "server.log"
    with log.open("w") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli", "server", "--api-port", str(api_port), "--ssh-port", str(ssh_port),
             "--web-port", str(web_port), "--data-dir", str(data)],
            env=env, cwd=ROOT, stdout=server_log, stderr=server_log,
        )
        try:
            def healthy() -> bool:
                if server.poll() is not None:
                    raise RuntimeError(f"orz server exited; see {log}")
                try:
                    return (httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).status_code == 200
                            and httpx.get(f"http://127.0.0.1:{web_port}/healthz", timeout=1).status_code == 200)
                except httpx.HTTPError:
                    return False

            wait_until(healthy, timeout=60, what="orz server")
            token_file = home / ".config" / "orzbob" / "token.json"
            wait_until(token_file.exists, timeout=10, what="the CLI login")
            import json

            token = json.loads(token_file.read_text())["api_token"]
            yield WebPlatform(home, data, env, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{web_port}",
                              ssh_port, token, log)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_for(predicate: object, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met")
