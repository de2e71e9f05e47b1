"""No plaintext secret value in the database: the SQLite files' bytes and a PostgreSQL dump."""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from sanic import Sanic
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.instances.providers.fake import FakeProvider
from api.settings import Settings
from tests.conftest import make_tenant

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings without the start-up schema check: the test client starts the app per request."""
    return settings.model_copy(update={"require_schema_head": False})


def encodings(value: str) -> list[bytes]:
    """The plaintext and the ways a careless store could spell it (hex in dumps, base64 in JSON)."""
    raw = value.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw), value.encode("utf-16-le")]


async def store_and_inject(app: Sanic, sessions: Sessions, provider: FakeProvider) -> list[str]:
    """Create, replace and inject secrets through the API; returns every value that was ever sent."""
    tenant = await make_tenant(sessions, "acme")
    values = [f"plain-{name}-{secrets.token_hex(10)}" for name in ("one", "two", "three")]
    for name, value in (("anthropic", values[0]), ("git", values[1])):
        body = {"name": name, "data": {"TOKEN_" + name.upper(): value}}
        _, resp = await app.asgi_client.post("/v1/secrets", json=body, headers=tenant.headers)
        assert resp.status == 201
    _, resp = await app.asgi_client.put("/v1/secrets/git", json={"data": {"TOKEN_GIT": values[2]}},
                                        headers=tenant.headers)
    assert resp.status == 200
    _, resp = await app.asgi_client.post("/v1/instances", json={"secrets": ["anthropic", "git"]},
                                         headers=tenant.headers)
    assert resp.status == 201
    env = provider.specs[resp.json["id"]].secret_env
    assert env == {"TOKEN_ANTHROPIC": values[0], "TOKEN_GIT": values[2]}
    return values


async def test_sqlite_files_hold_no_plaintext(app: Sanic, sessions: Sessions, provider: FakeProvider,
                                              settings: Settings) -> None:
    values = await store_and_inject(app, sessions, provider)
    database = Path(make_url(settings.database_url).database or "")
    files = [p for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]
    blob = b"".join(p.read_bytes() for p in files)
    assert b"anthropic" in blob and b"TOKEN_GIT" in blob  # the rows are there: names and keys in clear
    for value in values:
        for spelled in encodings(value):
            assert spelled not in blob, f"a secret value is stored in clear in {[p.name for p in files]}"
    # Nor anywhere else under the data dir (the generated key file holds only the key).
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert all(v.encode() not in path.read_bytes() for v in values), path


@pytest.mark.parametrize("empty_database_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
async def test_postgres_dump_holds_no_plaintext(app: Sanic, sessions: Sessions, provider: FakeProvider,
                                                settings: Settings) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        pytest.skip("pg_dump is not installed")
    values = await store_and_inject(app, sessions, provider)
    url = make_url(settings.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    dump = subprocess.run([pg_dump, "--no-owner", "--data-only", f"--dbname={url}"], capture_output=True,
                          check=True, timeout=30).stdout
    assert b"COPY public.secrets" in dump and b"anthropic" in dump and b"TOKEN_GIT" in dump
    for value in values:
        for spelled in encodings(value):
            assert spelled not in dump, "a secret value is stored in clear in PostgreSQL"
