"""Request bodies an outside audit broke the API with: control characters, deep JSON, whitespace bodies,
405s without Allow, and patterns the OpenAPI document did not carry (issue 17, items 3, 4 and 8)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sanic import Sanic
from sqlalchemy import func, select

from api import schemas
from api.db.models import Instance, Secret
from api.instances.providers.fake import FakeProvider
from api.openapi import REGISTRY, build_document
from tests.conftest import Tenant, both_databases, make_tenant

SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}
REPO = "https://example.com/acme/widgets.git"

# (path, body, the field the problem must name); every one of these used to reach the database.
CONTROL_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/instances", {"task": "fix the \x00 bug"}, "task"),
    ("/v1/instances", {"program": "vim\x00"}, "program"),
    ("/v1/instances", {"program": "vim \x1b[31m"}, "program"),
    ("/v1/instances", {"repo_url": "https://example.com/a\x00.git"}, "repo_url"),
    ("/v1/instances", {"repo_url": REPO, "branch": "ma\x00in"}, "branch"),
    ("/v1/instances", {"repo_url": REPO, "branch": "ma\x85in"}, "branch"),
    ("/v1/instances", {"secrets": ["db\x00"]}, "secrets.0"),
    ("/v1/secrets", {"name": "db\x00", "data": {"K": "v"}}, "name"),
    ("/v1/secrets", {"name": "db", "data": {"K": "hunter2\x00"}}, "data.K"),
    ("/v1/secrets", {"name": "db", "data": {"K\x00": "v"}}, "data"),
]


async def _count(sessions: Any, model: type) -> int:
    async with sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(model)) or 0)


@both_databases
@pytest.mark.parametrize(("path", "body", "field"), CONTROL_CASES)
async def test_control_characters_are_a_422_naming_the_field(app: Sanic, sessions, path, body, field) -> None:
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post(path, content=json.dumps(body).encode(), headers=t.headers)
    assert resp.status == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json["errors"][0]["field"].startswith(field)
    assert resp.json["detail"].startswith(f"{field.split('.')[0]}")
    assert "hunter2" not in resp.text  # a secret value is never echoed, not even around the bad character
    assert await _count(sessions, Instance) == 0 and await _count(sessions, Secret) == 0


@both_databases
async def test_text_fields_keep_newlines_and_tabs(app: Sanic, sessions) -> None:
    t = await make_tenant(sessions, "acme", plan="team")
    _, resp = await app.asgi_client.post("/v1/instances", headers=t.headers,
                                         json={"task": "step 1:\n\tfix it\r\n", "program": "make &&\n make test"})
    assert resp.status == 201, resp.text
    _, got = await app.asgi_client.get(f"/v1/instances/{resp.json['id']}", headers=t.headers)
    assert got.json["task"] == "step 1:\n\tfix it\r\n"
    _, resp = await app.asgi_client.post("/v1/secrets", headers=t.headers,
                                         json={"name": "tls", "data": {"KEY": "-----BEGIN-----\nabc\n-----END-----\n"}})
    assert resp.status == 201, resp.text


@both_databases
async def test_attach_and_secret_replace_refuse_control_characters(app: Sanic, sessions) -> None:
    t = await make_tenant(sessions, "acme")
    _, created = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = created.json["id"]
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers,
                                         json={"public_key": "ssh-ed25519 AAAA\x00x\n"})
    assert resp.status == 422 and resp.json["errors"][0]["field"] == "public_key"
    await app.asgi_client.post("/v1/secrets", headers=t.headers, json={"name": "db", "data": {"K": "v"}})
    _, resp = await app.asgi_client.put("/v1/secrets/db", headers=t.headers, json={"data": {"K": "\x00"}})
    assert resp.status == 422 and resp.json["errors"][0]["field"] == "data.K"


@both_databases
async def test_heartbeat_refuses_nul_but_carries_terminal_output(app: Sanic, sessions, provider: FakeProvider
                                                                 ) -> None:
    t = await make_tenant(sessions, "acme")
    _, created = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = created.json["id"]
    runner = {"Authorization": f"Bearer {provider.specs[sid].runner_token}"}
    url = f"/internal/v1/instances/{sid}/heartbeat"
    _, resp = await app.asgi_client.post(url, headers=runner, json={"fatal_error": "clone \x00 failed"})
    assert resp.status == 422 and resp.json["errors"][0]["field"] == "fatal_error"
    _, resp = await app.asgi_client.post(url, headers=runner,
                                         json={"fatal_error": "init failed: \x1b[31merror\x1b[0m\n"})
    assert resp.status == 200 and resp.json["state"] == "failed"


# ------------------------------------------------------------------------------------------ deep JSON

DEEP = b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}"


async def _route_context(app: Sanic, sessions: Any) -> tuple[Tenant, str, dict[str, str]]:
    t = await make_tenant(sessions, "acme", plan="team")
    _, created = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = created.json["id"]
    provider: FakeProvider = app.ctx.state.provider
    return t, sid, {"Authorization": f"Bearer {provider.specs[sid].runner_token}"}


@pytest.mark.parametrize("body", [DEEP, b"[" * 2000 + b"]" * 2000], ids=["in-object", "top-level"])
async def test_deeply_nested_json_is_a_400_on_every_json_route(app: Sanic, sessions, body: bytes) -> None:
    t, sid, runner = await _route_context(app, sessions)
    headers = {"api_token": t.headers, "service_token": SERVICE, "runner_token": runner}
    json_routes = [op for op in REGISTRY.operations if op.request is not None]
    assert len(json_routes) >= 6
    for op in json_routes:
        path = op.path.replace("{id}", sid).replace("{name}", "db")
        _, resp = await app.asgi_client.request(op.method.lower(), path, content=body,
                                                headers=headers[op.security or "api_token"])
        assert resp.status == 400, (op.method, op.path, resp.status, resp.text[:300])
        assert resp.headers["content-type"] == "application/problem+json"
        assert "nested too deeply" in resp.json["detail"] or "recursion" in resp.json["detail"]


@pytest.mark.parametrize("number", [b"1" * 5000, b"-" + b"9" * 4301], ids=["positive", "negative"])
async def test_a_number_too_long_to_read_is_a_400_on_every_json_route(app: Sanic, sessions, number: bytes) -> None:
    """Python reads integers of at most 4300 digits and says so with a ValueError, not a JSON error: anyone (the
    sign-in routes take no token) had a 500 and an error with its traceback in the log for each request."""
    t, sid, runner = await _route_context(app, sessions)
    headers = {"api_token": t.headers, "service_token": SERVICE, "runner_token": runner}
    for op in [op for op in REGISTRY.operations if op.request is not None]:
        path = op.path.replace("{id}", sid).replace("{name}", "db")
        _, resp = await app.asgi_client.request(op.method.lower(), path, content=b'{"a": ' + number + b"}",
                                                headers=headers[op.security or "api_token"])
        assert resp.status == 400, (op.method, op.path, resp.status, resp.text[:300])
        assert resp.json["detail"] == "body is not valid JSON: a number has more digits than the API reads"


async def test_moderately_deep_json_is_a_400_too(app: Sanic, sessions) -> None:
    """Nesting the first parser takes but the validating one refuses is bad JSON too, not a 422."""
    t = await make_tenant(sessions, "acme")
    body = b'{"task": ' + b"[" * 400 + b"]" * 400 + b"}"
    _, resp = await app.asgi_client.post("/v1/instances", content=body, headers=t.headers)
    assert resp.status == 400 and resp.json["code"] == "bad_request"


# --------------------------------------------------------------------------- empty bodies, 405 Allow


@pytest.mark.parametrize("body", [b" ", b"\n\t \r\n"])
async def test_whitespace_body_is_not_an_empty_body(app: Sanic, sessions, body: bytes) -> None:
    t = await make_tenant(sessions, "acme")
    _, created = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = created.json["id"]
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", content=body, headers=t.headers)
    assert resp.status == 400 and resp.headers["content-type"] == "application/problem+json"
    assert "token" not in resp.json
    _, resp = await app.asgi_client.post("/v1/instances", content=body, headers=t.headers)
    assert resp.status == 400
    assert await _count(sessions, Instance) == 1
    # No body at all still means "all defaults".
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers)
    assert resp.status == 200


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("patch", "/v1/instances", {"GET", "POST"}),
    ("put", "/v1/instances/abc", {"GET", "DELETE"}),
    ("delete", "/v1/secrets", {"GET", "POST"}),
    ("get", "/v1/instances/abc/stop", {"POST"}),
])
async def test_405_names_the_allowed_methods(app: Sanic, method: str, path: str, allowed: set[str]) -> None:
    _, resp = await app.asgi_client.request(method, path)
    assert resp.status == 405 and resp.headers["content-type"] == "application/problem+json"
    assert {m.strip() for m in resp.headers["allow"].split(",")} >= allowed


# ----------------------------------------------------------------------------------- the document


async def test_document_carries_every_enforced_string_rule(app: Sanic) -> None:
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    components = resp.json["components"]["schemas"]
    create = components["InstanceCreate"]["properties"]
    assert create["repo_url"]["anyOf"][0]["pattern"] == schemas.REPO_URL_PATTERN
    assert create["branch"]["anyOf"][0]["pattern"] == schemas.BRANCH_PATTERN
    data = components["SecretCreate"]["properties"]["data"]
    assert data["patternProperties"] == {schemas.ENV_NAME_RE.pattern: data["patternProperties"][
        schemas.ENV_NAME_RE.pattern]}
    assert data["additionalProperties"] is False  # a key outside the pattern is documented as refused
    assert components["SecretReplace"]["properties"]["data"]["additionalProperties"] is False
    # Every string a request body can carry has a pattern (or is an enum): nothing is "any string". The
    # internal routes' bodies too (heartbeats, runner reports: written from inside sessions), which the
    # public document leaves out: read the whole one.
    everything = build_document("test", internal=True)["components"]["schemas"]
    requests = {m.__name__ for m in _request_models()}
    assert requests <= everything.keys(), requests - everything.keys()
    for name in requests:
        for where, node in _string_nodes(everything[name]):
            assert "pattern" in node or "enum" in node or "const" in node, f"{name}.{where}"


def _request_models() -> list[type[schemas.Request]]:
    return [op.request for op in REGISTRY.operations if op.request is not None]


def _string_nodes(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if node.get("type") == "string":
            found.append((where, node))
        for key, sub in node.items():
            found += _string_nodes(sub, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            found += _string_nodes(sub, f"{where}[{i}]")
    return found


def _accepts(model: type[schemas.Request], **fields: Any) -> bool:
    try:
        model.model_validate_json(json.dumps(fields), strict=True)
    except ValidationError:
        return False
    return True


BRANCHY = st.text(alphabet=st.sampled_from(list("ab/.-@{}~^:?*[\\ \x00\x1f\x7f\x85lock")), min_size=1,
                  max_size=12)
URLY = st.lists(st.sampled_from([*"ab:/@.-_ \x00\x1f\x85\n", "https://", "file://", "git@"]),
                min_size=1, max_size=8).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(branch=BRANCHY, url=URLY)
def test_documented_patterns_agree_with_the_validators(branch: str, url: str) -> None:
    assert bool(re.fullmatch(schemas.BRANCH_PATTERN, branch)) == _accepts(schemas.InstanceCreate, repo_url=REPO,
                                                                       branch=branch), repr(branch)
    assert bool(re.fullmatch(schemas.REPO_URL_PATTERN, url)) == _accepts(schemas.InstanceCreate,
                                                                          repo_url=url), repr(url)
    examples: dict[str, tuple[type[schemas.Request], dict[str, Any]]] = {
        "line": (schemas.AuthorizeRequest, {"session_id": branch, "user_id": "usr_1", "method": "jwt"}),
        "text": (schemas.InstanceCreate, {"task": branch}),
        "log": (schemas.Heartbeat, {"fatal_error": branch}),
    }
    for rule, pattern in schemas.CONTROL_PATTERNS.items():
        model, fields = examples[rule]
        assert bool(re.fullmatch(pattern, branch)) == _accepts(model, **fields), (rule, repr(branch))


async def test_starting_a_session_whose_secret_is_gone_is_a_documented_problem(app: Sanic, sessions) -> None:
    """Found by the stateful schemathesis run: the refusal it answers was missing from the document."""
    t = await make_tenant(sessions, "acme")
    await app.asgi_client.post("/v1/secrets", headers=t.headers, json={"name": "db", "data": {"K": "v"}})
    _, created = await app.asgi_client.post("/v1/instances", headers=t.headers, json={"secrets": ["db"]})
    sid = created.json["id"]
    await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    await app.asgi_client.delete("/v1/secrets/db", headers=t.headers)
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/start", headers=t.headers)
    assert resp.status == 422 and resp.json["detail"] == "unknown secret: db"
    _, doc = await app.asgi_client.get("/v1/openapi.json")
    assert "422" in doc.json["paths"]["/v1/instances/{id}/start"]["post"]["responses"]
