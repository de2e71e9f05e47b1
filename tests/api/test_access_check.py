"""POST /internal/v1/access-check: the gateways' feed of live attachments that must end now."""

from __future__ import annotations

from sanic import Sanic

from api import admin
from api.instances.providers.fake import FakeProvider
from tests.api.test_internal import SERVICE, new_session
from tests.conftest import both_databases, make_tenant


async def check(app: Sanic, *pairs: tuple[str, str], headers: dict[str, str] = SERVICE):
    body = {"attachments": [{"session_id": s, "user_id": u} for s, u in pairs]}
    _, resp = await app.asgi_client.post("/internal/v1/access-check", json=body, headers=headers)
    return resp


@both_databases
async def test_disabled_user_deleted_session_and_foreign_session_are_revoked(app, sessions, provider: FakeProvider):
    alice = await make_tenant(sessions, "acme")
    bob = await make_tenant(sessions, "bobco")
    mine, _ = await new_session(app, alice, provider)
    doomed, _ = await new_session(app, alice, provider)
    theirs, _ = await new_session(app, bob, provider)

    resp = await check(app, (mine, alice.user_id), (doomed, alice.user_id), (theirs, bob.user_id))
    assert resp.status == 200 and resp.json == {"revoked": []}

    _, deleted = await app.asgi_client.delete(f"/v1/instances/{doomed}", headers=alice.headers)
    assert deleted.status in (200, 202)
    await admin.set_user_active(sessions, bob.email, False)
    resp = await check(app, (mine, alice.user_id), (doomed, alice.user_id), (theirs, bob.user_id),
                       (theirs, alice.user_id), (mine, "usr_nobody"))
    revoked = {(r["session_id"], r["user_id"]): r["reason"] for r in resp.json["revoked"]}
    assert revoked == {
        (doomed, alice.user_id): f"session {doomed} was deleted",
        (theirs, bob.user_id): "your account is disabled",
        (theirs, alice.user_id): f"session {theirs} was deleted",  # another org's: never revealed
        (mine, "usr_nobody"): "unknown user",
    }


async def test_needs_the_service_token_and_bounds_the_batch(app, sessions, provider: FakeProvider):
    alice = await make_tenant(sessions, "acme")
    sid, _ = await new_session(app, alice, provider)
    assert (await check(app, (sid, alice.user_id), headers=alice.headers)).status == 401
    assert (await check(app, *[(sid, alice.user_id)] * 1001)).status == 422
