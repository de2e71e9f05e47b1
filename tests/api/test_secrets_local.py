"""Secrets through the API into a real local runner: its environment, never its command line or disk."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sanic import Sanic
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app import create_app
from api.db.models import Instance
from api.instances.providers.base import ComputeSpec, ProviderState
from api.instances.providers.local import LocalProvider
from api.settings import Settings
from runner.tmux import Tmux
from tests.conftest import make_tenant
from tests.runner import conftest as runner_fixtures
from tests.runner.fake_api import FakeApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

short_tmp = runner_fixtures.short_tmp
make_repo = runner_fixtures.make_repo
gateway_key = runner_fixtures.gateway_key
fake_api = runner_fixtures.fake_api

# The program prints digests of what it sees, so the test can check the values without showing them.
PROGRAM = ("bash -c 'printf %s \"$ANTHROPIC_API_KEY\" | sha256sum; printf %s \"$AGENT_KEY\" | sha256sum; "
           "sleep infinity'")
CONFIG = 'version: "1.0"\nenv:\n  AGENT_KEY: ${ANTHROPIC_API_KEY}\n'


@pytest.fixture
def settings(settings: Settings, short_tmp: Path, fake_api: FakeApi,
             gateway_key: runner_fixtures.GatewayKey) -> Settings:
    # Runners heartbeat to the fake API; the data dir is short because tmux sockets live under it.
    return settings.model_copy(update={
        "data_dir": short_tmp / "data", "provider": "local", "internal_api_url": fake_api.url,
        "gateway_public_key": gateway_key.public, "heartbeat_interval_s": 1, "require_schema_head": False,
    })


class TellingProvider(LocalProvider):
    """The local provider, telling the stand-in API each runner token the service issues (as the real
    API knows the tokens it stores), before the runner can send its first heartbeat."""

    def __init__(self, settings: Settings, api: FakeApi) -> None:
        super().__init__(settings)
        self.api = api

    async def create(self, spec: ComputeSpec) -> ProviderState:
        self.api.expect(spec.session_id, spec.runner_token)
        return await super().create(spec)

    async def start(self, spec: ComputeSpec, state: ProviderState) -> ProviderState:
        self.api.expect(spec.session_id, spec.runner_token)
        return await super().start(spec, state)


@pytest.fixture
async def local(settings: Settings, fake_api: FakeApi) -> AsyncIterator[LocalProvider]:
    provider = TellingProvider(settings, fake_api)
    try:
        yield provider
    finally:
        for sid in await provider.list():
            await provider.delete(sid, {})
        await provider.close()


async def test_secret_reaches_the_runner_environment_only(
        settings: Settings, sessions: async_sessionmaker[AsyncSession], local: LocalProvider,
        make_repo: runner_fixtures.MakeRepo, fake_api: FakeApi, tmp_path: Path) -> None:
    app: Sanic = create_app(settings, provider=local)
    value = f"sk-ant-{secrets.token_hex(16)}"
    tenant = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/secrets", headers=tenant.headers,
                                         json={"name": "anthropic", "data": {"ANTHROPIC_API_KEY": value}})
    assert resp.status == 201
    repo = make_repo({".orz/cloud.yaml": CONFIG})
    _, resp = await app.asgi_client.post("/v1/instances", headers=tenant.headers, json={
        "repo_url": repo, "branch": "main", "program": PROGRAM, "secrets": ["anthropic"]})
    assert resp.status == 201, resp.text
    assert value not in resp.text
    sid = resp.json["id"]
    async with sessions() as db:
        row = await db.get(Instance, sid)
        assert row is not None
        pid = int(row.provider_state["pid"])

    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"ANTHROPIC_API_KEY={value}".encode() in environ
    assert value.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

    # The program in tmux sees the key, and ${ANTHROPIC_API_KEY} in cloud.yaml resolved to it.
    await fake_api.wait_for(lambda b: b.get("program_running"), timeout=20, session_id=sid)
    digest = hashlib.sha256(value.encode()).hexdigest()
    tmux = Tmux(local.session_dir(sid) / "state" / "tmux.sock")
    for _ in range(100):
        pane = await tmux.capture()
        if pane.count(digest) == 2:
            break
        await asyncio.sleep(0.1)
    assert pane.count(digest) == 2, pane
    assert value not in pane

    # Nothing on disk holds it in clear: session dirs, runner and init logs, keys, the database.
    for root in (settings.data_dir, tmp_path):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_socket():
                assert value.encode() not in path.read_bytes(), path
    for body in fake_api.bodies(sid):
        assert value not in str(body)
