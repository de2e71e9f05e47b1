"""Helpers for the lifecycle and scheduler tests: a fake clock, tenants as principals, running sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.auth import Principal
from api.db.models import Event, Instance, Org
from api.instances.providers.fake import FakeProvider
from api.instances.providers.local import LocalProvider
from api.instances.service import InstanceService
from api.settings import Settings
from tests.conftest import make_tenant

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBfakefakefakefakefakefakefakefakefakefakefake"


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, *, minutes: float = 0, days: float = 0) -> datetime:
        self.now += timedelta(seconds=seconds, minutes=minutes, days=days)
        return self.now


@dataclass
class World:
    """One org's user plus the service the tests drive (same clock and provider as the scheduler)."""

    who: Principal
    service: InstanceService
    provider: FakeProvider
    clock: FakeClock

    async def new_running(self, **create: object) -> Instance:
        """Create a session and bring it to `running` with a first heartbeat, as a runner would."""
        inst = await self.service.create(self.who, schemas.InstanceCreate(**create))  # type: ignore[arg-type]
        await self.heartbeat(inst.id)
        return await self.row(inst.id)

    async def heartbeat(self, session_id: str, **fields: object) -> schemas.HeartbeatReply:
        token = self.provider.specs[session_id].runner_token
        body = {"host_key": HOST_KEY, "ssh_host": "127.0.0.1", "ssh_port": 2200, "init_status": "succeeded",
                **fields}
        return await self.service.record_heartbeat(session_id, token, schemas.Heartbeat(**body))  # type: ignore[arg-type]

    async def row(self, session_id: str) -> Instance:
        async with self.service.db_sessions() as db:
            inst = await db.get(Instance, session_id)
            assert inst is not None
            return inst

    async def events(self, session_id: str) -> list[Event]:
        async with self.service.db_sessions() as db:
            return list(await db.scalars(select(Event).where(Event.instance_id == session_id).order_by(Event.id)))

    async def set_org(self, **values: object) -> None:
        async with self.service.db_sessions() as db:
            await db.execute(update(Org).where(Org.id == self.who.org_id).values(**values))
            await db.commit()


async def principal(sessions: async_sessionmaker[AsyncSession], org: str, plan: str = "team") -> Principal:
    tenant = await make_tenant(sessions, org, plan)
    async with sessions() as db:
        org_row = await db.scalar(select(Org).where(Org.name == org))
        assert org_row is not None
    return Principal(user_id=tenant.user_id, email=tenant.email, role="member", org_id=org_row.id,
                     org_name=org, plan=plan)


@asynccontextmanager
async def local_provider(settings: Settings) -> AsyncIterator[LocalProvider]:
    """A LocalProvider that, whatever the test left behind, stops every runner (and its tmux) at the end."""
    provider = LocalProvider(settings)
    try:
        yield provider
    finally:
        for sid in (await provider.list()):
            await provider.stop(sid, {})
        await provider.close()
