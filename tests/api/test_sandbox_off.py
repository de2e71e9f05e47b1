"""ORZ_SANDBOX=off: a single developer's choice, said at start, refused once a second org exists."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.db import migrate
from api.db.models import Instance
from api.errors import SandboxRequired
from api.instances.providers.fake import FakeProvider
from api.instances.providers.local import LocalProvider
from api.instances.service import InstanceService
from api.settings import Settings
from tests.api.lifecycle_support import principal
from tests.support import ROOT

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGateway gateway"


class UnisolatedFake(FakeProvider):
    """Stands in for the local provider with the sandbox off (no runner is started in this test)."""

    @property
    def isolates_sessions(self) -> bool:
        return False


def test_the_provider_says_so_when_it_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.instances.providers.local"):
        LocalProvider(Settings(data_dir=tmp_path, sandbox="off"))
        assert "ORZ_SANDBOX=off" in caplog.text
        caplog.clear()
        LocalProvider(Settings(data_dir=tmp_path))
        assert caplog.text == ""


async def test_sessions_start_with_one_org_and_are_refused_with_two(
        settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    service = InstanceService(settings, sessions, UnisolatedFake(), gateway_public_key=KEY)
    acme = await principal(sessions, "acme")
    first = await service.create(acme, schemas.InstanceCreate(program="bash"))
    await service.stop(acme, first.id)

    await principal(sessions, "beta")
    with pytest.raises(SandboxRequired) as refused:
        await service.create(acme, schemas.InstanceCreate(program="bash"))
    assert refused.value.status == 409 and "ORZ_SANDBOX=off" in refused.value.detail
    with pytest.raises(SandboxRequired):  # nor may a stopped one start again
        await service.start(acme, first.id)
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Instance)) == 1
    await service.wait_background()

    # The sandboxed local provider is not affected by the number of orgs.
    assert LocalProvider(settings).isolates_sessions


@pytest.mark.parametrize("sandbox", ["off", "on"])
def test_create_org_warns_when_the_sandbox_is_off(empty_database_url: str, tmp_path: Path, sandbox: str) -> None:
    env = {"ORZ_DATABASE_URL": empty_database_url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin",
           "ORZ_SANDBOX": sandbox, "PYTHONPATH": str(ROOT)}
    migrated = subprocess.run([sys.executable, "-m", "cli", "admin", "migrate"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    assert migrated.returncode == 0, migrated.stderr
    assert migrate.head_revision(empty_database_url)
    out = subprocess.run([sys.executable, "-m", "cli", "admin", "create-org", "beta"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "created org beta" in out.stdout, out.stderr
    assert ("ORZ_SANDBOX=off" in out.stderr) == (sandbox == "off"), out.stderr


class SocketFake(FakeProvider):
    """Stands in for the sandboxed local provider: runners serve on a unix socket the provider names."""

    def runner_socket(self, session_id: str) -> str | None:
        return f"/srv/orz/sessions/{session_id}/state/ssh.sock"


async def test_a_sandboxed_runner_cannot_choose_its_route(
        settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
    provider = SocketFake()
    service = InstanceService(settings, sessions, provider, gateway_public_key=KEY)
    acme = await principal(sessions, "acme")
    inst = await service.create(acme, schemas.InstanceCreate(program="bash"))
    token = provider.specs[inst.id].runner_token
    host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBfakefakefakefakefakefakefakefakefakefakefake"
    for spoof in ({"ssh_host": "127.0.0.1", "ssh_port": 2222},  # another session's TCP port
                  {"ssh_host": "unix:/srv/orz/sessions/other-1/state/ssh.sock"}):  # or its socket
        await service.record_heartbeat(inst.id, token, schemas.Heartbeat(host_key=host_key, **spoof))
        async with sessions() as db:
            row = await db.get(Instance, inst.id)
            assert row is not None
            assert row.route_host in (None, f"unix:{provider.runner_socket(inst.id)}"), row.route_host
    async with sessions() as db:
        row = await db.get(Instance, inst.id)
        assert row is not None and row.route_host == f"unix:{provider.runner_socket(inst.id)}"
        assert row.route_port == 0
    await service.wait_background()
