"""What clients of the earlier Go API read: a token in a session's attach_url, and `error` in every error."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from sanic import Sanic

from api.credentials import jwt as attach_jwt
from tests.conftest import both_databases, make_tenant


def claims_of(app: Sanic, attach_url: str) -> dict[str, object]:
    """The attach URL's token, verified as the gateway verifies it (public key, ES256 only)."""
    token = parse_qs(urlsplit(attach_url).query)["token"][0]
    settings = app.ctx.state.settings
    public = serialization.load_pem_public_key(
        attach_jwt.public_key_path(attach_jwt.jwt_key_path(settings)).read_bytes())
    claims = attach_jwt.verify(token, public, max_ttl_s=settings.attach_token_ttl_s)  # type: ignore[arg-type]
    return dict(pyjwt.decode(token, options={"verify_signature": False}), _jti=claims.jti)


@both_databases
async def test_created_and_fetched_sessions_carry_a_fresh_attach_token(app: Sanic, sessions, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    t = await make_tenant(sessions, "acme")
    _, created = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    assert created.status == 201
    sid = created.json["id"]
    url = created.json["attach_url"]
    # The Go CLI turns https into wss and anything else into ws, so the URL is http(s), as Go's was.
    assert url.startswith(f"http://127.0.0.1:8443/v1/instances/{sid}/attach?token=")
    first = claims_of(app, url)
    assert first["sid"] == sid and first["sub"] == t.user_id
    assert int(first["exp"]) - int(first["iat"]) == app.ctx.state.settings.attach_token_ttl_s

    _, fetched = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    second = claims_of(app, fetched.json["attach_url"])
    assert second["sid"] == sid and second["_jti"] != first["_jti"]  # each read: a token of its own

    _, listed = await app.asgi_client.get("/v1/instances", headers=t.headers)
    assert listed.json["instances"][0]["attach_url"] == f"http://127.0.0.1:8443/v1/instances/{sid}/attach"

    other = await make_tenant(sessions, "globex")
    _, foreign = await app.asgi_client.get(f"/v1/instances/{sid}", headers=other.headers)
    assert foreign.status == 404 and "token=" not in foreign.text
    for minted in (url, fetched.json["attach_url"]):
        assert parse_qs(urlsplit(minted).query)["token"][0] not in caplog.text  # never logged
    assert sid in caplog.text  # the requests were logged, the tokens were not


@both_databases
async def test_errors_carry_error_beside_detail(app: Sanic, sessions) -> None:
    t = await make_tenant(sessions, "acme")  # free plan: two active sessions
    for _ in range(2):
        _, ok = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
        assert ok.status == 201
    _, quota = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    assert quota.status == 429 and quota.headers["content-type"] == "application/problem+json"
    assert quota.json["error"] == quota.json["detail"] and "2 active sessions" in quota.json["error"]
    assert quota.json["limit"] == 2

    _, invalid = await app.asgi_client.post("/v1/instances", json={"tier": "huge"}, headers=t.headers)
    assert invalid.status == 422 and invalid.json["error"] == invalid.json["detail"] != ""
    _, missing = await app.asgi_client.get("/v1/instances/no-such-session", headers=t.headers)
    assert missing.status == 404 and missing.json["error"] == missing.json["detail"]
    _, anonymous = await app.asgi_client.get("/v1/instances")
    assert anonymous.status == 401 and anonymous.json["error"]
