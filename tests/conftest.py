"""Shared fixtures: databases (SQLite and a throwaway PostgreSQL database per test), settings, API."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sanic import Sanic
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import admin
from api.app import create_app
from api.db import migrate
from api.db.engine import create_engine, session_factory
from api.instances.providers.fake import FakeProvider
from api.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get("ORZ_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
# CI sets ORZ_TEST_POSTGRES_URL: there a PostgreSQL that does not answer fails the run instead of skipping.
POSTGRES_REQUIRED = "ORZ_TEST_POSTGRES_URL" in os.environ

Sanic.test_mode = True
# A suite started in the background of a shell without job control (`make test &` in a script, a CI
# runner's step) inherits SIGINT ignored, and every program it starts keeps that (Python, rightly, does not
# turn an ignored SIGINT into KeyboardInterrupt): the tests that press Ctrl-C on `orz` or stop a server
# with SIGINT would wait out their time-outs. The suite's children start as a terminal would start them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# The tests' git repositories are bare repos under /tmp (tests/runner/conftest.py make_repo): the admin
# setting that lets sessions clone file:// repositories from there, for every server a test starts.
os.environ.setdefault("ORZ_REPO_FILE_DIRS", "/tmp")  # nosec B108


async def _pg_exec(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _postgres_available() -> bool:
    try:
        asyncio.run(_pg_exec("SELECT 1"))
        return True
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False


_PG_STATE: dict[str, bool] = {}


def require_postgres() -> None:
    if "ok" not in _PG_STATE:
        _PG_STATE["ok"] = _postgres_available()
    if not _PG_STATE["ok"]:
        if POSTGRES_REQUIRED:
            pytest.fail(f"PostgreSQL is required but {POSTGRES_ADMIN_URL} does not answer")
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}")


@pytest.fixture
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: SQLite in tmp_path, or a fresh PostgreSQL database dropped afterwards."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'orz.db'}"
        return
    require_postgres()
    name = f"orz_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_exec(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A database migrated to head."""
    migrate.upgrade(empty_database_url)
    return empty_database_url


def both_databases(fn: object) -> object:
    """Run a test on SQLite and on PostgreSQL."""
    return pytest.mark.parametrize(
        "empty_database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
    )(fn)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        provider="fake",
        service_token="svc-test-token-0123456789",  # type: ignore[arg-type]
        log_json=False,
    )


@pytest.fixture
async def sessions(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings.database_url)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


@dataclass
class Tenant:
    org: str
    email: str
    token: str
    user_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_tenant(sessions: async_sessionmaker[AsyncSession], org: str, plan: str = "free",
                      email: str | None = None) -> Tenant:
    await admin.create_org(sessions, org, plan)
    email = email or f"dev@{org}.example"
    user = await admin.create_user(sessions, email, org)
    token = await admin.create_token(sessions, email)
    return Tenant(org=org, email=email, token=token, user_id=user.id)


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def app(settings: Settings, provider: FakeProvider) -> Sanic:
    return create_app(settings, provider=provider)


# The local provider's sessions' cgroups are made in one parent (ORZ_SANDBOX_CGROUP_PARENT), whose limits
# hold for all of them: each test process (an xdist worker) has its own, not a developer's server's.
os.environ.setdefault("ORZ_SANDBOX_CGROUP_PARENT", f"orz-test-{os.getpid()}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from api.instances.providers import sandbox_launch

    sandbox_launch.remove_cgroups(os.environ["ORZ_SANDBOX_CGROUP_PARENT"])  # once empty; a leak stays visible

