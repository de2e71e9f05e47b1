"""API load benchmark: GET /v1/instances/{id} and POST /v1/instances on one API worker (FakeProvider).

Run: `.venv/bin/python bench/api.py [--seconds 10] [--database sqlite|postgres]`.
The API runs in its own process (`orz api`, provider=fake); the load generator runs here. The
baseline is GET /healthz on the same server in the same run (no auth, no database), so the figures
are reported both absolute and as a ratio to what the server itself can do.

Creates are spread over many tenants on the team plan, each kept within its quota (20 active): a
single org with a lifted quota would measure counting thousands of its active sessions under the
org lock, which no real tenant has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import admin
from api.db import migrate
from api.db.engine import create_engine, session_factory
from bench.loadgen import build_request, run_load
from tests.support import free_port, wait_until

TEAM_QUOTA = 20
PG_ADMIN = os.environ.get("ORZ_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")


async def _prepare(url: str, tenants: int) -> list[str]:
    """One API token per tenant (an org on the team plan with one user)."""
    engine = create_engine(url)
    sessions = session_factory(engine)
    tokens = []
    for n in range(tenants):
        await admin.create_org(sessions, f"bench-{n}", "team")
        await admin.create_user(sessions, f"bench@{n}.example.com", f"bench-{n}")
        tokens.append(await admin.create_token(sessions, f"bench@{n}.example.com"))
    await engine.dispose()
    return tokens


def _creates(host: str, tokens: list[str], per_tenant: int) -> Iterator[bytes]:
    """Each tenant's create requests, interleaved so concurrent requests are for different tenants."""
    for _ in range(per_tenant):
        for token in tokens:
            yield build_request("POST", "/v1/instances", host, token, b'{"tier":"small"}')


def _pg(sql: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--post-concurrency", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=0,
                        help="orgs the creates are spread over (default: enough for 800 creates/s)")
    args = parser.parse_args()
    tenants = args.tenants or max(1, math.ceil(args.seconds * 800 / TEAM_QUOTA))

    tmp = Path(tempfile.mkdtemp(prefix="orz-bench-"))
    pg_name = None
    if args.database == "postgres":
        pg_name = f"orz_bench_{uuid.uuid4().hex[:8]}"
        _pg(f'CREATE DATABASE "{pg_name}"')
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{pg_name}"
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'orz.db'}"
    migrate.upgrade(url)
    tokens = asyncio.run(_prepare(url, tenants))
    token = tokens[0]
    port = free_port()
    env = {**os.environ, "ORZ_DATABASE_URL": url, "ORZ_PROVIDER": "fake", "ORZ_DATA_DIR": str(tmp),
           "ORZ_QUOTA_TEAM": str(TEAM_QUOTA), "ORZ_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen([sys.executable, "-m", "cli", "api", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _up(port), timeout=30, what="api")
        created = httpx.post(f"http://127.0.0.1:{port}/v1/instances", json={},
                             headers={"Authorization": f"Bearer {token}"}).json()
        host = f"127.0.0.1:{port}"
        results = {}
        for name, req, ok in [
            ("baseline GET /healthz", build_request("GET", "/healthz", host, token), {200}),
            ("GET /v1/instances/{id}", build_request("GET", f"/v1/instances/{created['id']}", host, token), {200}),
            # The GET's session already counts against tenant 0's quota.
            ("POST /v1/instances", _creates(host, tokens[1:] + tokens[:1], TEAM_QUOTA - 1), {201}),
        ]:
            # POST latency is measured at a modest concurrency: the target is a p99, not saturation.
            conc = args.post_concurrency if name.startswith("POST") else args.concurrency
            res = asyncio.run(run_load("127.0.0.1", port, req, concurrency=conc, seconds=args.seconds, ok=ok))
            results[name] = {**res.summary(), "concurrency": conc}
            time.sleep(0.5)
        base = results["baseline GET /healthz"]["rps"]
        for res in results.values():
            res["rps_vs_baseline"] = round(res["rps"] / base, 3) if base else None
        report = {"database": args.database, "seconds": args.seconds, "tenants": tenants, "results": results,
                  "targets": {"GET rps >=": 2000, "POST p99 ms <": 20}}
        print(json.dumps(report, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=10)
        if pg_name:
            _pg(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
