"""/v1/tokens: a user mints tokens for scripts, lists them and revokes one; nobody else's, never a value twice."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import select

from api import admin, api_tokens
from api.auth import authenticate_api_token
from api.db.models import ApiToken, RefreshToken
from api.errors import Conflict, Unauthorized
from tests.conftest import both_databases, make_tenant


async def _call(app, method: str, path: str, token: str, body: object = None):  # type: ignore[no-untyped-def]
    kwargs = {"headers": {"Authorization": f"Bearer {token}"}}
    if body is not None:
        kwargs["json"] = body
    _, resp = await getattr(app.asgi_client, method)(path, **kwargs)
    return resp


@both_databases
async def test_a_minted_token_works_is_listed_without_its_value_and_dies_when_revoked(
        app, sessions, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = await make_tenant(sessions, "acme")
    made = await _call(app, "post", "/v1/tokens", t.token, {"name": "ci pipeline", "expires_in_days": 30})
    assert made.status == 201 and made.headers["cache-control"] == "no-store"
    minted = made.json["token"]
    assert minted.startswith("orz_") and made.json["prefix"] == minted[:12] and made.json["source"] == "api"
    assert made.json["expires_at"] is not None and not made.json["current"]

    me = await _call(app, "get", "/v1/me", minted)
    assert me.status == 200 and me.json["user"]["email"] == t.email and me.json["source"] == "api"

    listed = await _call(app, "get", "/v1/tokens", t.token)
    assert listed.status == 200
    rows = {row["name"]: row for row in listed.json["tokens"]}
    assert set(rows) == {"default", "ci pipeline"}
    assert rows["default"]["current"] and not rows["ci pipeline"]["current"]
    assert minted not in listed.text and t.token not in listed.text

    gone = await _call(app, "delete", f"/v1/tokens/{made.json['id']}", t.token)
    assert gone.status == 204
    assert (await _call(app, "get", "/v1/me", minted)).status == 401
    assert [row["name"] for row in (await _call(app, "get", "/v1/tokens", t.token)).json["tokens"]] == ["default"]
    assert (await _call(app, "delete", f"/v1/tokens/{made.json['id']}", t.token)).status == 404  # once
    assert minted not in caplog.text  # the value is in the answer only


async def test_revoking_by_prefix_takes_effect_at_once_on_this_replica(app, sessions) -> None:
    """The principal cache trusts a verified token for auth_cache_ttl_s: the revoking replica forgets it."""
    t = await make_tenant(sessions, "acme")
    minted = (await _call(app, "post", "/v1/tokens", t.token, {"name": "laptop"})).json
    assert (await _call(app, "get", "/v1/me", minted["token"])).status == 200  # now cached
    assert (await _call(app, "delete", f"/v1/tokens/{minted['prefix']}", minted["token"])).status == 204
    assert (await _call(app, "get", "/v1/me", minted["token"])).status == 401


async def test_a_token_is_revoked_by_its_name_when_no_other_of_yours_has_it(app, sessions) -> None:
    """`orz cloud api-token revoke ci` said "you have no API token ci" although the token named ci was there."""
    t = await make_tenant(sessions, "acme")
    ci = (await _call(app, "post", "/v1/tokens", t.token, {"name": "ci"})).json
    assert (await _call(app, "delete", "/v1/tokens/ci", t.token)).status == 204
    assert (await _call(app, "get", "/v1/me", ci["token"])).status == 401
    # Two of that name: which one is not guessed; the answer lists their ids.
    one, two = [(await _call(app, "post", "/v1/tokens", t.token, {"name": "laptop"})).json for _ in range(2)]
    both = await _call(app, "delete", "/v1/tokens/laptop", t.token)
    assert both.status == 409 and one["id"] in both.json["detail"] and two["id"] in both.json["detail"]
    assert "ID or PREFIX" in both.json["detail"]
    assert (await _call(app, "get", "/v1/me", one["token"])).status == 200
    # Another user's token of that name is not theirs to revoke (nor to learn of).
    other = await make_tenant(sessions, "other")
    assert (await _call(app, "delete", "/v1/tokens/laptop", other.token)).status == 404


async def test_nobody_lists_or_revokes_another_users_token(app, sessions) -> None:
    mine = await make_tenant(sessions, "acme")
    theirs = await make_tenant(sessions, "other")
    colleague = await admin.create_user(sessions, "colleague@acme.example", "acme", role="admin")
    colleague_token = await admin.create_token(sessions, colleague.email)
    target = (await _call(app, "post", "/v1/tokens", mine.token, {"name": "ci"})).json
    for stranger in (theirs.token, colleague_token):  # another org, or an admin of the same one
        assert target["id"] not in (await _call(app, "get", "/v1/tokens", stranger)).text
        for key in (target["id"], target["prefix"]):
            refused = await _call(app, "delete", f"/v1/tokens/{key}", stranger)
            assert refused.status == 404 and refused.headers["content-type"] == "application/problem+json"
    assert (await _call(app, "get", "/v1/me", target["token"])).status == 200


async def test_bad_requests_are_refused_and_nothing_is_made(app, sessions) -> None:
    t = await make_tenant(sessions, "acme")
    for body in ({"name": ""}, {"name": "x" * 65}, {"name": "a\nb"}, {"name": "ci", "expires_in_days": 0},
                 {"name": "ci", "expires_in_days": 400}, {"name": "ci", "scope": "admin"}):
        refused = await _call(app, "post", "/v1/tokens", t.token, body)
        assert refused.status == 422, (body, refused.text)
    assert (await _call(app, "post", "/v1/tokens", "orz_" + "x" * 40, {"name": "ci"})).status == 401
    async with sessions() as db:
        assert len(list(await db.scalars(select(ApiToken)))) == 1


async def test_one_person_holds_at_most_the_limit(app, sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_tokens, "MAX_ACTIVE_TOKENS", 3)
    t = await make_tenant(sessions, "acme")
    assert [(await _call(app, "post", "/v1/tokens", t.token, {"name": f"t{i}"})).status for i in range(3)] == [
        201, 201, 409]
    refused = await _call(app, "post", "/v1/tokens", t.token, {"name": "t3"})
    assert refused.status == 409 and "revoke one first" in refused.json["detail"]
    never = (await _call(app, "post", "/v1/tokens", t.token, {"name": "x", "expires_in_days": None}))
    assert never.status == 409


@both_databases
async def test_concurrent_mints_stop_at_the_limit(app, sessions, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script minting in parallel does not get past the cap: each mint counts what the others made."""
    monkeypatch.setattr(api_tokens, "MAX_ACTIVE_TOKENS", 3)
    t = await make_tenant(sessions, "acme")
    who = await authenticate_api_token(sessions, t.token)
    results = await asyncio.gather(*(api_tokens.create_token(sessions, who, f"t{i}", None) for i in range(8)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 2, results  # "default" is the third
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException)), results
    assert len(await api_tokens.list_tokens(sessions, who.user_id)) == 3


@both_databases
async def test_a_token_that_stopped_working_mints_nothing(app, sessions) -> None:
    """A replica trusts a verified token for auth_cache_ttl_s, and a request checked it a moment ago: the
    holder of a leaked token must not use that while to mint one that outlives its revocation or the
    owner's disabling (and works again when the owner is enabled again)."""
    t = await make_tenant(sessions, "acme")
    leaked = (await _call(app, "post", "/v1/tokens", t.token, {"name": "leaked"})).json
    stale = await authenticate_api_token(sessions, leaked["token"])  # what the cache holds
    assert (await _call(app, "delete", f"/v1/tokens/{leaked['id']}", t.token)).status == 204
    with pytest.raises(Unauthorized, match="revoked"):
        await api_tokens.create_token(sessions, stale, "persist", None)

    stale = await authenticate_api_token(sessions, t.token)
    await admin.set_user_active(sessions, t.email, False)
    with pytest.raises(Unauthorized, match="disabled"):
        await api_tokens.create_token(sessions, stale, "persist", None)
    await admin.set_user_active(sessions, t.email, True)
    async with sessions() as db:
        assert list(await db.scalars(select(ApiToken.name).where(ApiToken.revoked_at.is_(None)))) == []


async def test_revoking_a_sign_in_token_ends_its_sign_in(app, sessions, settings) -> None:
    """A sign-in's API token comes with a refresh token: revoking the one revokes the other, or the
    sign-in would mint itself a fresh API token with it."""
    from api.errors import OrzError
    from api.signin.service import SignInService
    t = await make_tenant(sessions, "acme")
    user = await admin.create_user(sessions, "signin@acme.example", "acme")
    svc = SignInService(settings, sessions, None)  # type: ignore[arg-type]  # no secrets box: not used here
    try:
        async with sessions() as db:
            pair = await svc._issue(db, user, "github", family_id="fam_test")  # what a finished sign-in stores
        row = (await _call(app, "get", "/v1/tokens", pair.access_token)).json["tokens"][0]
        assert row["source"] == "github" and row["current"]
        assert (await _call(app, "delete", f"/v1/tokens/{row['id']}", pair.access_token)).status == 204
        with pytest.raises(OrzError, match="invalid, expired or revoked"):
            await svc.refresh(pair.refresh_token or "")
        async with sessions() as db:
            assert all(r.revoked_at is not None for r in await db.scalars(select(RefreshToken)))
    finally:
        await svc.aclose()
    assert (await _call(app, "get", "/v1/me", t.token)).status == 200  # another user's login is untouched


@both_databases
async def test_an_operator_lists_and_revokes_one_token_of_anyone(app, sessions, settings, tmp_path) -> None:
    """The leak playbook's single-token step: `orz admin list-tokens EMAIL`, then `orz admin revoke-token`,
    and the user's other tokens keep working."""
    import asyncio
    import subprocess
    import sys

    t = await make_tenant(sessions, "acme")
    leaked = (await _call(app, "post", "/v1/tokens", t.token, {"name": "laptop"})).json
    env = {"ORZ_DATABASE_URL": settings.database_url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def orz_admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "admin", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    listed = await asyncio.to_thread(orz_admin, "list-tokens", t.email)
    assert listed.returncode == 0, listed.stderr
    assert leaked["prefix"] in listed.stdout and "laptop" in listed.stdout and leaked["token"] not in listed.stdout
    done = await asyncio.to_thread(orz_admin, "revoke-token", leaked["prefix"])
    assert done.returncode == 0 and f"of {t.email}" in done.stdout, done.stderr
    assert (await _call(app, "get", "/v1/me", leaked["token"])).status == 401
    assert (await _call(app, "get", "/v1/me", t.token)).status == 200
    again = await asyncio.to_thread(orz_admin, "revoke-token", leaked["prefix"])
    assert again.returncode != 0 and "not revoked already" in again.stderr and "Traceback" not in again.stderr


async def test_a_token_value_in_the_path_is_not_repeated_in_the_answer(app, sessions) -> None:
    t = await make_tenant(sessions, "acme")
    other = await make_tenant(sessions, "other")
    refused = await _call(app, "delete", f"/v1/tokens/{other.token}", t.token)
    assert refused.status == 404 and other.token not in refused.text and other.token[:12] in refused.text
