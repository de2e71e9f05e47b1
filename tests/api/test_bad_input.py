"""Every bad request is a 4xx application/problem+json answer, and nothing is created by it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import func, select

from api.db.models import Instance
from api.serve import ApiServer
from tests.conftest import make_tenant

BAD_BODIES = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (b'"a string"', 400),
    (b"\xff\xfe", 400),
    (b'{"tier": "huge"}', 422),
    (b'{"tier": 3}', 422),
    (b'{"surprise": true}', 422),
    (b'{"repo_url": "--upload-pack=touch /tmp/x"}', 422),
    (b'{"repo_url": "https://x/y.git", "branch": "../../etc"}', 422),
    (b'{"repo_url": "https://x/y.git", "branch": "-b"}', 422),
    (b'{"secrets": "not-a-list"}', 422),
    (b'{"secrets": ["UPPER CASE"]}', 422),
    (b'{"idle_timeout_s": -5}', 422),
    (b'{"program": ""}', 422),
    # Values only the server can refuse (its plan's limit, the names it holds) are refused alike.
    (b'{"idle_timeout_s": 604800}', 422),
    (b'{"secrets": ["ghost"]}', 422),
]


@pytest.mark.parametrize(("body", "status"), BAD_BODIES)
async def test_bad_create_bodies_are_problems_and_create_nothing(app, sessions, body, status):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", content=body, headers=t.headers)
    assert resp.status == status
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json["status"] == status and resp.json["detail"]
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Instance)) == 0


async def test_validation_problem_names_the_field(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={"tier": "huge"}, headers=t.headers)
    assert resp.json["detail"].startswith("tier:")
    assert resp.json["errors"][0]["field"] == "tier"


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("post", "/v1/instances", {"idle_timeout_s": 604800}, "idle_timeout_s"),
    ("post", "/v1/instances", {"secrets": ["ghost"]}, "secrets"),
    ("get", "/v1/secrets/db?scope=everyone", None, "scope"),
    ("get", "/v1/webhooks/wh_0/deliveries?limit=5000", None, "limit"),
])
async def test_values_the_server_refuses_are_422_naming_the_field(app, sessions, method, path, body, field):
    """Not only a schema rule: a limit or name only the server knows is the same 422 (the CLI exits 2)."""
    t = await make_tenant(sessions, "acme")
    kwargs = {"json": body} if body is not None else {}
    _, resp = await getattr(app.asgi_client, method)(path, headers=t.headers, **kwargs)
    assert (resp.status, resp.json["code"]) == (422, "validation_failed"), resp.json
    assert [e["field"] for e in resp.json["errors"]] == [field]


async def test_oversize_body_is_413(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post(
        "/v1/instances", content=b'{"task": "' + b"x" * (300 * 1024) + b'"}', headers=t.headers
    )
    assert resp.status == 413
    assert resp.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("bad_id", ["UPPER", "a" * 40, "-lead", "x%2F..%2Fy", "%00", "with.dot"])
async def test_bad_ids_are_404(app, sessions, bad_id):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.get(f"/v1/instances/{bad_id}", headers=t.headers)
    assert resp.status == 404
    assert resp.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic abc", "Bearer orz_short", "Bearer orz_" + "A" * 43, "Bearer " + "x" * 5000],
)
async def test_missing_or_wrong_tokens_are_401(app, sessions, authorization):
    await make_tenant(sessions, "acme")
    headers = {"Authorization": authorization} if authorization is not None else {}
    _, resp = await app.asgi_client.get("/v1/instances", headers=headers)
    assert resp.status == 401
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.headers["www-authenticate"].startswith("Bearer")


async def test_unknown_route_and_method_are_problems(app):
    _, resp = await app.asgi_client.get("/v1/nothing-here")
    assert resp.status == 404 and resp.headers["content-type"] == "application/problem+json"
    _, resp = await app.asgi_client.patch("/v1/instances")
    assert resp.status == 405 and resp.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("url", [
    "https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@github.com/acme/app.git",  # GitHub: a token as the user
    "https://x-access-token:ghs_abcdef0123456789@github.com/acme/app.git",
    "https://oauth2:glpat-abcdef0123456789@gitlab.com/acme/app.git",
    "http://user:hunter2@git.example.com/app.git",
    "ssh://git:hunter2@git.example.com/app.git",
])
async def test_a_token_in_the_repo_url_is_refused_and_never_repeated(app, sessions, url):
    """It would be stored with the session and shown to org admins, in webhooks and logs; the answer says
    how to give the token as a secret instead, and holds no part of it."""
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={"repo_url": url}, headers=t.headers)
    assert (resp.status, resp.json["code"]) == (422, "validation_failed"), resp.json
    assert [e["field"] for e in resp.json["errors"]] == ["repo_url"]
    assert "GIT_TOKEN" in resp.json["detail"]
    secret = url.split("//", 1)[1].split("@", 1)[0]
    assert all(part not in resp.text for part in secret.split(":") if part not in ("git", "user", "oauth2"))
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(Instance)) == 0


@pytest.mark.parametrize("url", ["ssh://git@git.example.com/app.git", "git@github.com:acme/app.git",
                                 "https://github.com/acme/app.git"])
async def test_an_ssh_user_name_is_no_credential(app, sessions, url):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={"repo_url": url}, headers=t.headers)
    assert resp.status == 201, resp.json


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/me"),  # an API token
    ("POST", "/internal/v1/authorize"),  # the service token
    ("POST", "/internal/v1/instances/demo-1/heartbeat"),  # a runner token
])
async def test_a_token_that_is_not_text_is_a_401(app, sessions, method, path, caplog):
    """Bytes that are not UTF-8 in the header reached the token's hashing as surrogates: anyone had a 500, and an
    ERROR line with its traceback, per request. Only a real HTTP server passes such bytes on (not the test client)."""
    server = await ApiServer.start(app, "127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n".encode()
                         + b"Authorization: Bearer orz_\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\r\n\r\n{}")
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
    finally:
        await server.stop()
    assert status_line.split()[1] == b"401", status_line
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
