"""API tokens: shown once, stored as prefix + SHA-256, revocable, and disabled users are locked out."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update

from api import admin
from api.db import tokens
from api.db.models import ApiToken, Org
from tests.conftest import both_databases, make_tenant


async def test_token_is_stored_hashed_never_in_clear(app, sessions, settings):
    t = await make_tenant(sessions, "acme")
    assert t.token.startswith("orz_") and len(t.token) > 40
    async with sessions() as db:
        row = (await db.scalars(select(ApiToken))).one()
    assert row.token_hash == tokens.digest(t.token) and t.token not in (row.prefix, row.token_hash)
    db_file = settings.database_url.split("///", 1)[1]
    for path in (Path(db_file), Path(db_file + "-wal")):
        if path.exists():
            assert t.token.encode() not in path.read_bytes()


async def test_wrong_token_with_right_prefix_is_refused(app, sessions):
    t = await make_tenant(sessions, "acme")
    forged = t.token[:-4] + ("AAAA" if not t.token.endswith("AAAA") else "BBBB")
    _, resp = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status == 401


async def test_revoked_token_is_refused(app, sessions):
    t = await make_tenant(sessions, "acme")
    async with sessions() as db:
        await db.execute(update(ApiToken).values(revoked_at=datetime.now(UTC)))
        await db.commit()
    _, resp = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert resp.status == 401 and resp.json["detail"] == "invalid or revoked API token"


async def test_disabled_user_is_refused(app, sessions):
    t = await make_tenant(sessions, "acme")
    await admin.set_user_active(sessions, t.email, False)
    _, resp = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert resp.status == 401 and resp.json["detail"] == "this account is disabled"


async def test_enabling_a_user_again_does_not_bring_their_old_tokens_back(app, sessions):
    """The credential-leak playbook (docs/launch-checklist.md): disable the user, give them a new token,
    enable them. The leaked token must stay dead; before, enable-user made it work again."""
    t = await make_tenant(sessions, "acme")
    await admin.set_user_active(sessions, t.email, False)
    fresh = await admin.create_token(sessions, t.email, name="after-the-leak")
    _, leaked = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert leaked.status == 401 and leaked.json["detail"] == "this account is disabled"
    await admin.set_user_active(sessions, t.email, True)
    _, leaked = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert leaked.status == 401 and leaked.json["detail"] == "invalid or revoked API token"
    _, me = await app.asgi_client.get("/v1/me", headers={"Authorization": f"Bearer {fresh}"})
    assert me.status == 200 and me.json["user"]["email"] == t.email


@both_databases
async def test_me_says_when_sessions_stop_and_go(app, sessions):
    """`/v1/me` names the idle timeout and the retention the reaper applies to the org (its own values where an
    admin set them), so `orz cloud new` and `whoami` can tell users before it happens."""
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert (resp.json["org"]["idle_timeout_s"], resp.json["org"]["retention_s"]) == (30 * 60, 7 * 24 * 3600)
    async with sessions() as db:
        await db.execute(update(Org).where(Org.name == "acme").values(idle_timeout_s=600, retention_s=86400))
        await db.commit()
    _, resp = await app.asgi_client.get("/v1/me", headers=t.headers)
    assert (resp.json["org"]["idle_timeout_s"], resp.json["org"]["retention_s"]) == (600, 86400)
