"""Local sidecars (postgres, redis) from the installed binaries, reachable from inside the session."""

from __future__ import annotations

import glob
import shutil
import socket

import pytest

from tests.runner.conftest import MakeRepo, StartRunner
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]




@pytest.mark.skipif(not glob.glob("/usr/lib/postgresql/*/bin/postgres") or not shutil.which("psql"),
                    reason="needs the PostgreSQL server binaries and psql")
async def test_postgres_sidecar_answers_psql_on_localhost(make_repo: MakeRepo,
                                                          start_runner: StartRunner) -> None:
    port = free_port()
    config = f"""\
version: "1.0"
services:
  db:
    image: postgres:16
    env: {{POSTGRES_USER: app, POSTGRES_PASSWORD: "${{PG_PASSWORD}}", POSTGRES_DB: appdb}}
    ports: [{port}]
    health: {{command: "pg_isready -h 127.0.0.1 -p {port}", interval: 0.5s, timeout: 2s, retries: 40}}
"""
    handle = await start_runner(make_repo({".orz/cloud.yaml": config}), secrets={"PG_PASSWORD": "s3cret"})
    await handle.ready(timeout=30)
    async with await handle.connect() as conn:
        result = await conn.run(
            f"PGPASSWORD=$PG_PASSWORD psql -h localhost -p {port} -U app -d appdb -tAc 'select 40 + 2'",
            check=False)
        assert result.exit_status == 0, result.stderr
        assert result.stdout.strip() == b"42"
        wrong = await conn.run(f"PGPASSWORD=nope psql -h localhost -p {port} -U app -d appdb -c 'select 1'",
                               check=False)
        assert wrong.exit_status != 0
    assert await handle.finish() == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"), reason="needs redis")
async def test_redis_sidecar_with_default_health(make_repo: MakeRepo, start_runner: StartRunner) -> None:
    port = free_port()
    config = f'version: "1.0"\nservices:\n  cache:\n    image: redis:7\n    ports: [{port}]\n'
    handle = await start_runner(make_repo({".orz/cloud.yaml": config}))
    await handle.ready()
    async with await handle.connect() as conn:
        result = await conn.run(f"redis-cli -h localhost -p {port} ping", check=False)
        assert result.stdout.strip() == b"PONG"
    assert await handle.finish() == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
