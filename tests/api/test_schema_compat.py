"""Old code on a newer schema (rollbacks, rolling upgrades), `orz admin migrate` run from several Pods at
once or before the database answers, and services that wait for the schema instead of crash-looping.

"New code" is the project's migrations plus one temporary migration in a copy of migrations/ (expand-only
or contracting); "old code" is the project as it is.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

import migrations
from api.app import create_app
from api.db import migrate
from api.db.engine import create_engine
from api.errors import SchemaNotAtHead
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from api.settings import Settings
from tests.conftest import both_databases
from tests.support import ROOT, free_port, orz_env, stop_process, wait_until

EXTRA = {
    "expand": ("True", """
    op.create_table("extra_notes", sa.Column("id", sa.Integer(), primary_key=True))
""", """
    op.drop_table("extra_notes")
"""),
    # Old code still inserts into used_jtis: dropping it breaks that code.
    "contract": ("False", """
    op.drop_table("used_jtis")
""", """
    op.create_table("used_jtis", sa.Column("jti", sa.String(64), nullable=False),
                    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
                    sa.PrimaryKeyConstraint("jti", name="pk_used_jtis"))
    op.create_index("ix_used_jtis_expires_at", "used_jtis", ["expires_at"])
"""),
}


def new_code(tmp_path: Path, kind: str) -> Path:
    """A copy of migrations/ with one more revision on top of today's head."""
    target = tmp_path / f"migrations-{kind}"
    if target.exists():
        return target
    shutil.copytree(Path(migrations.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__"))
    head = migrate.head_revision("sqlite://")
    flag, up, down = EXTRA[kind]
    (target / "versions" / "9001_extra.py").write_text(f'''"""temporary {kind} migration"""
import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"
branch_labels = None
depends_on = None
expand_only = {flag}


def upgrade() -> None:{up}

def downgrade() -> None:{down}
''')
    return target


@both_databases
async def test_old_code_runs_on_an_expanded_schema_not_on_a_contracted_one(empty_database_url: str,
                                                                          tmp_path: Path) -> None:
    url = empty_database_url
    old_head = migrate.head_revision(url)
    for kind in ("expand", "contract"):
        scripts = new_code(tmp_path, kind)
        done = await migrate.migrate(url, script_location=scripts)
        assert (done.after, done.action) == ("9001", "migrated")
        state = await migrate.read_schema_state(url)
        if kind == "expand":
            assert state.compatible >= {"9001", old_head}
            await migrate.ensure_at_head(url)  # old code starts
            again = await migrate.migrate(url)  # old code's migrate: a successful no-op
            assert (again.action, again.after) == ("ahead", "9001")
        else:
            assert old_head not in state.compatible
            with pytest.raises(SchemaNotAtHead, match=f"newer than this version .*--revision {old_head}"):
                await migrate.ensure_at_head(url)
            with pytest.raises(migrate.MigrationError, match="not compatible"):
                await migrate.migrate(url)
        # The rollback the refusal names: new code takes the schema back to the old head.
        back = await migrate.migrate(url, revision=old_head, script_location=scripts)
        assert back.after == old_head
        await migrate.ensure_at_head(url)
    # Forward and back all the way, temporary migration included.
    scripts = new_code(tmp_path, "contract")
    await migrate.migrate(url, revision="base", script_location=scripts)
    assert await migrate.current_revision(url) is None
    await migrate.migrate(url, script_location=scripts)
    assert await migrate.current_revision(url) == "9001"


def test_every_migration_says_whether_it_is_expand_only() -> None:
    scripts = migrate.script_directory("sqlite://")
    for script in scripts.walk_revisions():
        assert isinstance(migrate.expand_only(script), bool)


def _migrate_process(url: str, tmp_path: Path, *args: str, stderr: Path | None = None) -> subprocess.Popen[str]:
    env = orz_env(tmp_path / "home", ORZ_DATABASE_URL=url, ORZ_DATA_DIR=str(tmp_path / "data"),
                  ORZ_LOG_JSON="false")
    argv = [sys.executable, "-m", "cli", "admin", "migrate", *args]
    if stderr is None:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with stderr.open("w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)


@pytest.mark.postgres
@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
async def test_concurrent_migrates_take_turns(empty_database_url: str, tmp_path: Path) -> None:
    url = empty_database_url
    engine = create_engine(url)
    try:
        async with engine.connect() as holder:  # another Pod's migrate, mid-run
            await holder.execute(text(f"SELECT pg_advisory_lock({migrate.LOCK_SQL})"), {"k": migrate.LOCK_KEY})
            await holder.commit()
            logs = [tmp_path / f"migrate-{i}.log" for i in range(2)]
            procs = [_migrate_process(url, tmp_path / str(i), stderr=logs[i]) for i in range(2)]
            waiting = "another `orz admin migrate` is running on this database; waiting"
            for log in logs:
                await asyncio.to_thread(wait_until, lambda log=log: waiting in log.read_text(), 90,
                                        0.1, "migrate to wait for the lock")
            assert all(p.poll() is None for p in procs), "migrate ran while another held the lock"
            assert await migrate.current_revision(url) is None
            await holder.execute(text(f"SELECT pg_advisory_unlock({migrate.LOCK_SQL})"), {"k": migrate.LOCK_KEY})
            await holder.commit()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        await engine.dispose()
    head = migrate.head_revision(url)
    for proc, out, log in zip(procs, outs, logs, strict=True):
        assert proc.returncode == 0, log.read_text()
        assert f"database at revision {head}" in out
    await migrate.ensure_at_head(url)


def test_migrate_waits_for_the_database_then_gives_up_clearly(tmp_path: Path) -> None:
    url = f"postgresql://root@127.0.0.1:{free_port()}/nothing"
    proc = _migrate_process(url, tmp_path, "--wait", "2")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "waiting for the database to answer" in err
    assert "the database did not answer within 2 s" in err
    assert "Traceback" not in err


@both_databases
async def test_api_waits_for_the_schema_not_ready_then_serves(empty_database_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=empty_database_url, provider="fake",
                        schema_wait_s=120)
    server = await ApiServer.start(create_app(settings, provider=FakeProvider()), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as http:
            assert (await http.get("/healthz")).status_code == 200  # alive: no restart
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "orz admin migrate" in ready.json()["checks"]["schema"]
            me = await http.get("/v1/me", headers={"Authorization": "Bearer orz_x"})
            assert me.status_code == 503 and me.json()["code"] == "not_ready"
            await migrate.migrate(empty_database_url)
            for _ in range(150):
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.2)
            assert (await http.get("/readyz")).status_code == 200
            assert (await http.get("/v1/me")).status_code == 401  # serving: asks for a token
    finally:
        await server.stop()


def test_orz_api_gives_up_after_its_bound_naming_the_command(tmp_path: Path) -> None:
    env = orz_env(tmp_path / "home", ORZ_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'orz.db'}",
                  ORZ_DATA_DIR=str(tmp_path / "data"), ORZ_PROVIDER="fake", ORZ_API_PORT=str(free_port()),
                  ORZ_SCHEMA_WAIT_S="2", ORZ_LOG_JSON="false")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api"], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: proc.poll() is not None, timeout=60, what="orz api to give up")
    finally:
        _, err = stop_process(proc)
    assert proc.returncode != 0
    assert "waiting for the database schema" in err
    assert "run `orz admin migrate`" in err.splitlines()[-1]
