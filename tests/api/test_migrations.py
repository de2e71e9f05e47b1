"""Migrations run forward, back and forward again on SQLite and PostgreSQL; services refuse old schemas."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from sqlalchemy import inspect

from api.app import create_app
from api.db import migrate
from api.db.engine import create_engine
from api.errors import SchemaNotAtHead
from api.settings import Settings
from tests.conftest import both_databases

TABLES = {"orgs", "users", "api_tokens", "instances", "events", "secrets", "used_jtis", "scheduler_leases"}


async def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names())) - {"alembic_version"}
    finally:
        await engine.dispose()


@both_databases
def test_up_down_up(empty_database_url):
    url = empty_database_url
    migrate.upgrade(url)
    assert asyncio.run(table_names(url)) >= TABLES
    assert asyncio.run(migrate.current_revision(url)) == migrate.head_revision(url)
    migrate.downgrade(url, "base")
    assert asyncio.run(table_names(url)) == set()
    assert asyncio.run(migrate.current_revision(url)) is None
    migrate.upgrade(url)
    assert asyncio.run(table_names(url)) >= TABLES
    asyncio.run(migrate.ensure_at_head(url))


def test_models_match_migrations(empty_database_url):
    """Autogenerate against a migrated database finds nothing to add: models and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from api.db.base import Base

    migrate.upgrade(empty_database_url)

    async def diff() -> list:
        engine = create_engine(empty_database_url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
        finally:
            await engine.dispose()

    assert asyncio.run(diff()) == []


async def test_app_refuses_an_unmigrated_database_and_names_the_command(empty_database_url, tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=empty_database_url, provider="fake", schema_wait_s=0)
    with pytest.raises(SchemaNotAtHead, match="orz admin migrate"):
        await migrate.ensure_at_head(settings.database_url)
    app = create_app(settings)
    with pytest.raises(SchemaNotAtHead):
        await app.asgi_client.get("/healthz")


def test_admin_migrate_command(empty_database_url, tmp_path):
    env = {"ORZ_DATABASE_URL": empty_database_url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "cli", "admin", "migrate"], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    head = migrate.head_revision(empty_database_url)
    assert f"database at revision {head}" in out.stdout
    out = subprocess.run([sys.executable, "-m", "cli", "admin", "create-org", "acme"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and "created org acme (free)" in out.stdout


@both_databases
def test_admin_migrate_prints_one_sentence_per_migration(empty_database_url, tmp_path):
    """No log lines of alembic's (JSON, or 'Context impl ...'): what ran, or that nothing had to."""
    env = {"ORZ_DATABASE_URL": empty_database_url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> list[str]:
        out = subprocess.run([sys.executable, "-m", "cli", "admin", "migrate", *args], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        return out.stdout.splitlines()

    scripts = migrate.script_directory(empty_database_url)
    order = [s.revision for s in reversed(list(scripts.walk_revisions()))]
    head = order[-1]
    lines = run()
    assert lines[0] == "applied 0001: initial schema"
    assert [line.split(":")[0] for line in lines[:-1]] == [f"applied {rev}" for rev in order]
    assert lines[-1] == f"database at revision {head}"
    assert run() == [f"database at revision {head}: already up to date"]
    back = run("--revision", order[-3])
    assert [line.split(":")[0] for line in back] == [f"rolled back {order[-1]}", f"rolled back {order[-2]}",
                                                      f"database at revision {order[-3]}"]
    # An explicit revision ahead of the database is an upgrade (alembic's "not an ancestor" is not a failure).
    assert [line.split(":")[0] for line in run("--revision", order[-2])] == [
        f"applied {order[-2]}", f"database at revision {order[-2]}"]
    assert run("--revision", "head")[-1] == f"database at revision {head}"


def test_admin_commands_name_the_database_they_cannot_reach(tmp_path):
    """An operator with a wrong ORZ_DATABASE_URL read "orz: [Errno 111] Connect call failed (...)" (or
    "internal error: DBAPIError" for a database that does not exist), nothing saying it was the database."""
    from tests.support import free_port

    url = f"postgresql://orz:hunter2-not-shown@127.0.0.1:{free_port()}/orz"
    env = {"ORZ_DATABASE_URL": url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for args in (["create-org", "acme"], ["pending"], ["disable-user", "ada@example.com"]):
        out = subprocess.run([sys.executable, "-m", "cli", "admin", *args], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 1
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("orz: cannot use the database at postgresql://orz:***@127.0.0.1:"), out.stderr
        assert "ORZ_DATABASE_URL" in last and "internal error" not in out.stderr
        assert "hunter2" not in out.stderr + out.stdout


async def _sql(url: str, *statements: str) -> list[tuple]:
    from datetime import UTC, datetime

    from sqlalchemy import text

    params = {"now": datetime(2026, 12, 5, 12, tzinfo=UTC), "nonce": b"\0" * 16}
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            rows: list[tuple] = []
            for statement in statements:
                result = await conn.execute(text(statement), {k: v for k, v in params.items() if f":{k}" in statement})
                if result.returns_rows:
                    rows = [tuple(r) for r in result]
            return rows
    finally:
        await engine.dispose()


@both_databases
def test_roles_migration_keeps_admins_and_everything_hanging_off_users(empty_database_url):
    """0003 fills role from is_admin and keeps is_admin for the previous release's code; back and forth,
    no user, token or session is lost on the way."""
    url = empty_database_url
    migrate.upgrade(url, "0001")
    asyncio.run(_sql(
        url,
        "INSERT INTO orgs (id, name, plan, quota_serial, created_at) VALUES ('org_1', 'acme', 'team', 0, :now)",
        "INSERT INTO users (id, email, org_id, is_active, is_admin, created_at) VALUES "
        "('usr_a', 'a@x', 'org_1', true, true, :now), ('usr_m', 'm@x', 'org_1', true, false, :now)",
        "INSERT INTO api_tokens (id, user_id, name, prefix, token_hash, created_at) VALUES "
        "('tok_1', 'usr_m', 'default', 'orz_abc', 'h', :now)",
    ))
    migrate.upgrade(url)
    assert asyncio.run(_sql(url, "SELECT id, role FROM users ORDER BY id")) == [
        ("usr_a", "admin"), ("usr_m", "member")]
    assert asyncio.run(_sql(url, "SELECT id FROM api_tokens")) == [("tok_1",)]
    asyncio.run(_sql(url, "INSERT INTO users (id, email, org_id, is_active, is_admin, created_at) VALUES "
                          "('usr_n', 'n@x', 'org_1', true, false, :now)"))
    assert asyncio.run(_sql(url, "SELECT role FROM users WHERE id = 'usr_n'")) == [("member",)]
    migrate.downgrade(url, "0001")
    assert asyncio.run(_sql(url, "SELECT id, is_admin FROM users ORDER BY id")) == [
        ("usr_a", True), ("usr_m", False), ("usr_n", False)]
    assert asyncio.run(_sql(url, "SELECT id FROM api_tokens")) == [("tok_1",)]
    migrate.upgrade(url)
    assert asyncio.run(_sql(url, "SELECT role FROM users WHERE id = 'usr_a'")) == [("admin",)]


@both_databases
def test_credentials_leave_the_repository_urls_stored_before_they_were_refused(empty_database_url):
    """0012: a token in a session's repo_url (accepted until 2026-12-05) is taken out of the session, its
    events and its webhook bodies; URLs without one, and ssh user names, stay as they were."""
    url = empty_database_url
    migrate.upgrade(url, "0011")
    token = "ghp_" + "x" * 20
    instance = ("INSERT INTO instances (id, org_id, user_id, state, tier, repo_url, spec, provider, provider_state,"
                " attached_clients, created_at, updated_at, state_changed_at) VALUES "
                "('{id}', 'org_1', 'usr_a', 'running', 'small', '{repo}', '{{}}', 'local', '{{}}', 0, :now, :now, "
                ":now)")
    asyncio.run(_sql(
        url,
        "INSERT INTO orgs (id, name, plan, quota_serial, created_at) VALUES ('org_1', 'acme', 'team', 0, :now)",
        "INSERT INTO users (id, email, org_id, is_active, is_admin, role, created_at) VALUES "
        "('usr_a', 'a@x', 'org_1', true, true, 'admin', :now)",
        instance.format(id="tok", repo=f"https://{token}@github.com/acme/app.git"),
        instance.format(id="pw", repo=f"ssh://git:{token}@forge.example/acme/app.git"),
        instance.format(id="plain", repo="git@github.com:acme/app.git"),
        "INSERT INTO events (instance_id, org_id, at, actor, kind, message) VALUES "
        "('tok', 'org_1', :now, 'usr_a', 'created', 'tier small, repo https://oauth2:glpat-secret@gitlab.com/a/b')",
        "INSERT INTO webhooks (id, org_id, user_id, url, format, events, key_id, nonce, ciphertext, created_at) "
        "VALUES ('wh_1', 'org_1', 'usr_a', 'https://hooks.example/x', 'json', '[]', 'k', :nonce, :nonce, :now)",
        "INSERT INTO webhook_deliveries (id, webhook_id, event, instance_id, body, state, attempts, "
        "next_attempt_at, log, created_at) VALUES ('whd_1', 'wh_1', 'session.created', 'tok', "
        "'{\"repo_url\": \"https://ghp_secret@github.com/acme/app.git\"}', 'pending', 0, :now, '[]', :now)",
    ))
    migrate.upgrade(url)
    repos = dict(asyncio.run(_sql(url, "SELECT id, repo_url FROM instances")))
    assert repos == {"tok": "https://github.com/acme/app.git", "pw": "ssh://git@forge.example/acme/app.git",
                     "plain": "git@github.com:acme/app.git"}
    stored = asyncio.run(_sql(url, "SELECT message FROM events")) + asyncio.run(_sql(
        url, "SELECT body FROM webhook_deliveries"))
    assert stored == [("tier small, repo https://gitlab.com/a/b",), ('{"repo_url": "https://github.com/acme/app.git"}',)]
    migrate.downgrade(url, "0011")  # nothing to undo, and nothing breaks
    assert asyncio.run(_sql(url, "SELECT count(*) FROM instances")) == [(3,)]
