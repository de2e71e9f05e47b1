"""Key rotation: every row re-encrypted under the new key id, readable before, during and after."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import admin, schemas
from api.auth import Principal
from api.credentials.secrets_box import SecretsBox
from api.credentials.secrets_keys import KeyRing, parse_keyring
from api.db.models import Secret
from api.errors import SecretUnreadable
from api.secrets.rotate import key_usage, rotate_all
from api.secrets.service import SecretService
from cli.admin import admin as orz_admin
from tests.conftest import both_databases, make_tenant

Sessions = async_sessionmaker[AsyncSession]
OLD = base64.b64encode(b"\x01" * 32).decode()
NEW = base64.b64encode(b"\x02" * 32).decode()


def box(text: str) -> SecretsBox:
    return SecretsBox(parse_keyring(text, "test"))


async def principal(sessions: Sessions, org: str, *, role: str = "member") -> Principal:
    tenant = await make_tenant(sessions, org)
    async with sessions() as db:
        from api.db.models import Org

        org_row = await db.scalar(select(Org).where(Org.name == org))
        assert org_row is not None
    return Principal(user_id=tenant.user_id, email=tenant.email, role=role, org_id=org_row.id,
                     org_name=org, plan="free")


async def seed(sessions: Sessions, svc: SecretService, count: int) -> dict[tuple[str, str, str], dict[str, str]]:
    """Secrets over two orgs and both scopes; returns what each should decrypt to."""
    expected = {}
    for org in ("acme", "globex"):
        who = await principal(sessions, org, role="admin")
        for i in range(count):
            scope = "org" if i % 3 == 0 else "user"
            data = {f"KEY_{i}": os.urandom(8).hex(), "SHARED_NAME": f"{org}-{i}"}
            await svc.create(who, schemas.SecretCreate(name=f"s{i}", data=data, scope=scope))
            expected[(who.org_id, who.user_id, f"s{i}")] = data
    return expected


async def read_all(sessions: Sessions, svc: SecretService,
                   expected: dict[tuple[str, str, str], dict[str, str]]) -> None:
    async with sessions() as db:
        for (org_id, user_id, name), data in expected.items():
            assert await svc.env_for(db, org_id, user_id, [name]) == data


@both_databases
async def test_rotation_rewrites_every_row_and_keeps_them_readable(sessions: Sessions,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    old_svc = SecretService(sessions, box(f"old:{OLD}"))
    expected = await seed(sessions, old_svc, 4)
    async with sessions() as db:
        before = {r.id: (r.updated_at, r.nonce) for r in await db.scalars(select(Secret))}
    assert await key_usage(sessions) == {"old": 8}

    both = SecretService(sessions, box(f"new:{NEW},old:{OLD}"))
    await read_all(sessions, both, expected)  # a replica with the new key first still reads old rows

    reads = 0

    async def keep_reading(done: asyncio.Event) -> None:
        nonlocal reads
        while not done.is_set():
            await read_all(sessions, both, expected)
            reads += 1
            await asyncio.sleep(0)

    done = asyncio.Event()
    reader = asyncio.create_task(keep_reading(done))
    report = await rotate_all(sessions, both.box, batch_size=3)
    done.set()
    await reader
    assert reads >= 1
    assert report.key_id == "new" and report.rotated == 8 and report.failed == []
    assert await key_usage(sessions) == {"new": 8}

    async with sessions() as db:
        after = {r.id: (r.updated_at, r.nonce) for r in await db.scalars(select(Secret))}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # updated_at kept
    assert all(after[k][1] != before[k][1] for k in before)  # fresh nonces

    # Only the new key is needed now; the old-only box fails closed, naming the key id it lacks.
    await read_all(sessions, SecretService(sessions, box(f"new:{NEW}")), expected)
    with pytest.raises(SecretUnreadable, match="key id 'new', which is not configured"):
        await read_all(sessions, old_svc, expected)

    again = await rotate_all(sessions, both.box)
    assert again.rotated == 0
    for data in expected.values():
        for value in data.values():
            assert value not in caplog.text


@both_databases
async def test_rotation_reports_unreadable_rows_and_goes_on(sessions: Sessions) -> None:
    old_svc = SecretService(sessions, box(f"old:{OLD}"))
    expected = await seed(sessions, old_svc, 3)
    async with sessions() as db:
        victim = await db.scalar(select(Secret).order_by(Secret.id).limit(1))
        assert victim is not None
        await db.execute(update(Secret).where(Secret.id == victim.id)
                         .values(ciphertext=victim.ciphertext[:-1] + bytes([victim.ciphertext[-1] ^ 1])))
        await db.commit()
    report = await rotate_all(sessions, box(f"new:{NEW},old:{OLD}"), batch_size=2)
    assert report.rotated == 5
    assert [sid for sid, _ in report.failed] == [victim.id]
    assert "failed authentication under key id 'old'" in report.failed[0][1]
    assert await key_usage(sessions) == {"new": 5, "old": 1}
    del expected


@both_databases
def test_cli_rotate_generates_a_key_and_rotates(database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "orzdata"
    env = {"ORZ_DATABASE_URL": database_url, "ORZ_DATA_DIR": str(data_dir), "ORZ_SECRETS_KEY": "",
           "ORZ_SECRETS_KEY_FILE": ""}

    async def prepare() -> tuple[str, str, str]:
        from api.db.engine import create_engine, session_factory
        from api.settings import Settings

        engine = create_engine(database_url)
        sessions = session_factory(engine)
        try:
            svc = SecretService(sessions, SecretsBox.from_settings(Settings(data_dir=data_dir)))
            await admin.create_org(sessions, "acme")
            user = await admin.create_user(sessions, "dev@acme.example", "acme")
            org_id = user.org_id
            who = Principal(user.id, user.email, False, org_id, "acme", "free")
            await svc.create(who, schemas.SecretCreate(name="git", data={"GIT_TOKEN": "tok-cli-rotation-7e1"}))
            return org_id, user.id, svc.box.current_key_id
        finally:
            await engine.dispose()

    org_id, user_id, first_kid = asyncio.run(prepare())
    runner = CliRunner()
    result = runner.invoke(orz_admin, ["rotate-secrets-key", "--generate"], env=env)
    assert result.exit_code == 0, result.output
    key_file = data_dir / "keys" / "secrets.key"
    ring = parse_keyring(key_file.read_text(), "file")
    assert ring.ids[1] == first_kid and ring.current_id != first_kid
    assert f"added key {ring.current_id}" in result.output
    assert f"1 secrets re-encrypted under key {ring.current_id}" in result.output
    assert "older keys may be removed" in result.output
    assert "tok-cli-rotation-7e1" not in result.output

    async def check() -> dict[str, str]:
        from api.db.engine import create_engine, session_factory

        engine = create_engine(database_url)
        try:
            sessions = session_factory(engine)
            assert await key_usage(sessions) == {ring.current_id: 1}
            # The new key alone opens the row now.
            svc = SecretService(sessions, SecretsBox(KeyRing(ring.keys[:1])))
            async with sessions() as db:
                return await svc.env_for(db, org_id, user_id, ["git"])
        finally:
            await engine.dispose()

    assert asyncio.run(check()) == {"GIT_TOKEN": "tok-cli-rotation-7e1"}

    # With keys in ORZ_SECRETS_KEY, --generate refuses and says what to do instead.
    refused = runner.invoke(orz_admin, ["rotate-secrets-key", "--generate"],
                            env={**env, "ORZ_SECRETS_KEY": f"only:{NEW}"})
    assert refused.exit_code == 1 and "put the new key first" in refused.output
