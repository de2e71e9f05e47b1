"""A real API server (Sanic on a free port, FakeProvider, migrated SQLite) and a sandboxed `orz`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sanic import Sanic

from api import schemas
from api.app import create_app
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from api.settings import Settings
from tests.conftest import Tenant, make_tenant

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")
GATEWAY_PORT = 2222  # the default ssh_port the attach route hands out; nothing listens there in these tests


@dataclass
class LiveApi:
    url: str
    app: Sanic
    provider: FakeProvider
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tenant(self, org: str, plan: str = "free") -> Tenant:
        return self.call(make_tenant(self.app.ctx.state.sessions, org, plan))

    @contextlib.contextmanager
    def runners_heartbeating(self, interval_s: float = 0.3) -> Iterator[None]:
        """Play every session's runner from a thread while the block runs (sessions become running)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                for sid in list(self.provider.specs):
                    self.heartbeat(sid)
                time.sleep(interval_s)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(5)

    def heartbeat(self, session_id: str, **fields: Any) -> schemas.HeartbeatReply:
        """Play the session's runner: one heartbeat with its runner token (makes it running)."""
        spec = self.provider.specs[session_id]
        body = schemas.Heartbeat(host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Uta2V5LWZvci10ZXN0cy0wMDAw",
                                 ssh_host="127.0.0.1", ssh_port=2, init_status="succeeded", **fields)
        return self.call(self.app.ctx.state.instances.record_heartbeat(session_id, spec.runner_token, body))


@pytest.fixture
def live_api(settings: Settings) -> Iterator[LiveApi]:
    provider = FakeProvider()
    app = create_app(settings, provider=provider)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-api", daemon=True)
    thread.start()
    server: ApiServer | None = None
    try:
        server = asyncio.run_coroutine_threadsafe(ApiServer.start(app, "127.0.0.1", 0), loop).result(15)
        yield LiveApi(url=f"http://127.0.0.1:{server.port}", app=app, provider=provider, loop=loop)
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and XDG_CONFIG_HOME in tmp, for subprocesses and in-process CliRunner calls alike."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for var in ("ORZBOB_API_URL", "ORZBOB_TOKEN", "ORZ_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    return home


@dataclass
class Orz:
    """Runs the real `orz` (`python -m cli`) as a subprocess in the sandboxed HOME."""

    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORZBOB_", "ORZ_"))}
        env.update(HOME=str(self.home), XDG_CONFIG_HOME=str(self.home / ".config"), PYTHONPATH=str(ROOT),
                   COLUMNS="80", NO_COLOR="1")
        env.update(extra)
        return env

    def __call__(self, *args: str, cwd: Path | None = None, input: str | None = None,
                 **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd or ROOT, env=self.env(**env),
                              capture_output=True, text=True, timeout=30, input=input, check=False)


@pytest.fixture
def orz(home: Path) -> Orz:
    return Orz(home)


@pytest.fixture
def logged_in(orz: Orz, live_api: LiveApi) -> Tenant:
    tenant = live_api.tenant("acme")
    done = orz("cloud", "login", "--token", tenant.token, "--api-url", live_api.url)
    assert done.returncode == 0, done.stderr
    return tenant
