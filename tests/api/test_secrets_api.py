"""/v1/secrets over HTTP, injection into sessions, and no value anywhere it should not be."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import pytest
from sanic import Sanic
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import admin
from api.db.models import Event, Instance
from api.db.models import Secret as SecretRow
from api.instances.providers.fake import FakeProvider
from api.settings import Settings
from tests.conftest import Tenant, both_databases, make_tenant

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings without the start-up schema check: the test client starts the app per request."""
    return settings.model_copy(update={"require_schema_head": False})


def marker(label: str) -> str:
    """A value no test data could contain by accident."""
    return f"{label}-{secrets.token_hex(12)}"


class Client:
    """The app's ASGI client, checking that no response ever carries a secret value."""

    def __init__(self, app: Sanic, tenant: Tenant, forbidden: list[str]) -> None:
        self.app = app
        self.tenant = tenant
        self.forbidden = forbidden

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": self.tenant.headers}
        if body is not None:
            kwargs["json"] = body
        _, resp = await getattr(self.app.asgi_client, method)(path, **kwargs)
        for value in self.forbidden:
            assert value not in resp.text, f"{method.upper()} {path} returned a secret value"
        return resp.status, (resp.json if resp.text else None)


async def admin_tenant(sessions: Sessions, org: str) -> Tenant:
    email = f"admin@{org}.example"
    user = await admin.create_user(sessions, email, org, role="admin")
    token = await admin.create_token(sessions, email)
    return Tenant(org=org, email=email, token=token, user_id=user.id)


def assert_no_value_logged(caplog: pytest.LogCaptureFixture, values: list[str]) -> None:
    text = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    for value in values:
        assert value not in text


@both_databases
async def test_crud_never_returns_values(app: Sanic, sessions: Sessions, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    v1, v2, v3 = marker("v1"), marker("v2"), marker("v3")
    c = Client(app, await make_tenant(sessions, "acme"), [v1, v2, v3])

    status, body = await c.call("post", "/v1/secrets", {"name": "anthropic", "data": {"ANTHROPIC_API_KEY": v1}})
    assert status == 201
    assert body["name"] == "anthropic" and body["keys"] == ["ANTHROPIC_API_KEY"] and body["scope"] == "user"
    assert set(body) == {"name", "keys", "scope", "created_at", "updated_at"}

    status, body = await c.call("post", "/v1/secrets", {"name": "anthropic", "data": {"OTHER": v2}})
    assert status == 409 and body["code"] == "conflict"

    status, body = await c.call("get", "/v1/secrets")
    assert status == 200 and [s["name"] for s in body["secrets"]] == ["anthropic"]

    status, body = await c.call("get", "/v1/secrets/anthropic")
    assert status == 200 and body["keys"] == ["ANTHROPIC_API_KEY"]

    status, body = await c.call("put", "/v1/secrets/anthropic", {"data": {"B_KEY": v2, "A_KEY": v3}})
    assert status == 200 and body["keys"] == ["A_KEY", "B_KEY"]
    assert body["updated_at"] >= body["created_at"]

    status, body = await c.call("put", "/v1/secrets/nope", {"data": {"K": v2}})
    assert status == 404

    status, body = await c.call("delete", "/v1/secrets/anthropic")
    assert status == 204 and body is None
    status, body = await c.call("get", "/v1/secrets/anthropic")
    assert status == 404 and body["code"] == "not_found"
    status, body = await c.call("delete", "/v1/secrets/anthropic")
    assert status == 404
    assert_no_value_logged(caplog, [v1, v2, v3])


@both_databases
async def test_another_orgs_secret_is_not_found(app: Sanic, sessions: Sessions) -> None:
    value = marker("acme")
    acme = Client(app, await make_tenant(sessions, "acme"), [value])
    other = Client(app, await make_tenant(sessions, "other"), [value])
    assert (await acme.call("post", "/v1/secrets", {"name": "git", "data": {"GIT_TOKEN": value}}))[0] == 201

    assert (await other.call("get", "/v1/secrets/git"))[0] == 404
    assert (await other.call("put", "/v1/secrets/git", {"data": {"GIT_TOKEN": "x"}}))[0] == 404
    assert (await other.call("delete", "/v1/secrets/git"))[0] == 404
    assert (await other.call("get", "/v1/secrets"))[1] == {"secrets": []}
    # The same name in another org is a different secret, not a conflict.
    assert (await other.call("post", "/v1/secrets", {"name": "git", "data": {"GIT_TOKEN": "y"}}))[0] == 201
    assert (await acme.call("get", "/v1/secrets/git"))[0] == 200


async def test_user_and_org_scopes(app: Sanic, sessions: Sessions) -> None:
    value = marker("scoped")
    alice = Client(app, await make_tenant(sessions, "acme"), [value])
    bob_tenant_email = "bob@acme.example"
    await admin.create_user(sessions, bob_tenant_email, "acme")
    bob_token = await admin.create_token(sessions, bob_tenant_email)
    bob = Client(app, Tenant("acme", bob_tenant_email, bob_token, ""), [value])
    boss = Client(app, await admin_tenant(sessions, "acme"), [value])

    assert (await alice.call("post", "/v1/secrets", {"name": "mine", "data": {"K": value}}))[0] == 201
    # Another user of the same org does not see a user-scoped secret.
    assert (await bob.call("get", "/v1/secrets/mine"))[0] == 404
    assert (await bob.call("get", "/v1/secrets"))[1] == {"secrets": []}

    status, body = await alice.call("post", "/v1/secrets", {"name": "shared", "data": {"K": value}, "scope": "org"})
    assert status == 403 and "admins" in body["detail"]
    status, body = await boss.call("post", "/v1/secrets", {"name": "shared", "data": {"K": value}, "scope": "org"})
    assert status == 201 and body["scope"] == "org"
    assert [s["name"] for s in (await bob.call("get", "/v1/secrets"))[1]["secrets"]] == ["shared"]
    assert (await bob.call("put", "/v1/secrets/shared", {"data": {"K": "x"}}))[0] == 403
    assert (await bob.call("delete", "/v1/secrets/shared"))[0] == 403

    # A user's own secret of the same name shadows the org's; ?scope= picks explicitly.
    assert (await bob.call("post", "/v1/secrets", {"name": "shared", "data": {"MINE": value}}))[0] == 201
    assert (await bob.call("get", "/v1/secrets/shared"))[1]["keys"] == ["MINE"]
    assert (await bob.call("get", "/v1/secrets/shared?scope=org"))[1]["keys"] == ["K"]
    assert (await bob.call("get", "/v1/secrets/shared?scope=bogus"))[0] == 422
    listed = (await bob.call("get", "/v1/secrets"))[1]["secrets"]
    assert [(s["name"], s["scope"]) for s in listed] == [("shared", "org"), ("shared", "user")]
    assert (await boss.call("delete", "/v1/secrets/shared?scope=org"))[0] == 204


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"name": "Bad Name", "data": {"K": "v"}}, "name"),
    ({"name": "ok", "data": {"1BAD": "v"}}, "data"),
    ({"name": "ok", "data": {"BAD-KEY": "v"}}, "data"),
    ({"name": "ok", "data": {}}, "data"),
    ({"name": "ok", "data": {"ORZ_RUNNER_TOKEN": "v"}}, "data.ORZ_RUNNER_TOKEN"),
    ({"name": "ok", "data": {"K": "nul\x00inside"}}, "data.K"),
    ({"name": "ok", "data": {"A": "x" * 40000, "B": "y" * 40000}}, "data"),
    ({"name": "ok", "data": {"K": "z" * 70000}}, "data.K"),
    ({"name": "ok", "data": {"K": "v"}, "scope": "team"}, "scope"),
    ({"name": "ok", "data": {"K": "v"}, "extra": 1}, "extra"),
]


async def test_bad_input_is_a_422_that_does_not_echo_values(app: Sanic, sessions: Sessions) -> None:
    tenant = await make_tenant(sessions, "acme")
    for body, field in BAD_BODIES:
        for method, path in (("post", "/v1/secrets"), ("put", "/v1/secrets/ok")):
            sent = body if method == "post" else {k: v for k, v in body.items() if k not in ("name", "scope")}
            if method == "put" and set(sent) == {"data"} and field in ("name", "scope"):
                continue
            _, resp = await getattr(app.asgi_client, method)(path, json=sent, headers=tenant.headers)
            assert resp.status == 422, (method, body.keys(), resp.text[:200])
            assert resp.headers["content-type"] == "application/problem+json"
            assert resp.json["errors"][0]["field"].startswith(field)
            for value in body["data"].values():
                if len(value) > 1:
                    assert value not in resp.text


async def test_body_that_is_not_json_does_not_echo_it(app: Sanic, sessions: Sessions) -> None:
    tenant = await make_tenant(sessions, "acme")
    value = marker("raw")
    for raw in (f'{{"name": "x", "data": {{"K": "{value}"', f'{{"name": "x", "data": {{"K": "{value}\xff"}}}}'):
        _, resp = await app.asgi_client.post("/v1/secrets", content=raw.encode("latin-1"), headers=tenant.headers)
        assert resp.status == 400 and value not in resp.text


async def test_secrets_need_a_token(app: Sanic) -> None:
    _, resp = await app.asgi_client.get("/v1/secrets")
    assert resp.status == 401


async def test_openapi_documents_secrets(app: Sanic) -> None:
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    paths = resp.json["paths"]
    assert set(paths["/v1/secrets"]) == {"get", "post"}
    assert set(paths["/v1/secrets/{name}"]) == {"get", "put", "delete"}
    assert "204" in paths["/v1/secrets/{name}"]["delete"]["responses"]


# ------------------------------------------------------------------------------------------- injection


async def count(sessions: Sessions, model: type) -> int:
    async with sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(model)) or 0)


@both_databases
async def test_create_instance_injects_secret_env(app: Sanic, sessions: Sessions, provider: FakeProvider,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    anthropic, git, shared = marker("anthropic"), marker("git"), marker("shared")
    values = [anthropic, git, shared]
    user = Client(app, await make_tenant(sessions, "acme"), values)
    boss = Client(app, await admin_tenant(sessions, "acme"), values)
    await user.call("post", "/v1/secrets", {"name": "anthropic", "data": {"ANTHROPIC_API_KEY": anthropic}})
    await user.call("post", "/v1/secrets", {"name": "git", "data": {"GIT_TOKEN": git}})
    await boss.call("post", "/v1/secrets", {"name": "team-tools", "data": {"TOOLS_KEY": shared}, "scope": "org"})

    status, body = await user.call("post", "/v1/instances",
                                   {"program": "claude", "secrets": ["anthropic", "git", "team-tools"]})
    assert status == 201, body
    assert body["secrets"] == ["anthropic", "git", "team-tools"]
    spec = provider.specs[body["id"]]
    assert dict(spec.secret_env) == {"ANTHROPIC_API_KEY": anthropic, "GIT_TOKEN": git, "TOOLS_KEY": shared}
    assert anthropic not in repr(spec)

    # Events, status and logs responses carry names at most.
    await user.call("get", f"/v1/instances/{body['id']}/status")
    await user.call("get", f"/v1/instances/{body['id']}/logs")
    async with sessions() as db:
        messages = " ".join(str(e.message) for e in await db.scalars(select(Event)))
        instance = await db.get(Instance, body["id"])
        assert instance is not None
        stored = f"{instance.spec} {instance.provider_state}"
    for value in values:
        assert value not in messages and value not in stored

    # Stop and start again: the values are resolved afresh for the new compute.
    await user.call("post", f"/v1/instances/{body['id']}/stop")
    await user.call("put", "/v1/secrets/git", {"data": {"GIT_TOKEN": anthropic}})
    status, _ = await user.call("post", f"/v1/instances/{body['id']}/start")
    assert status == 200
    assert provider.specs[body["id"]].secret_env["GIT_TOKEN"] == anthropic
    assert_no_value_logged(caplog, values)


@both_databases
async def test_unknown_secret_fails_the_create_and_creates_nothing(app: Sanic, sessions: Sessions,
                                                                    provider: FakeProvider) -> None:
    value = marker("known")
    user = Client(app, await make_tenant(sessions, "acme"), [value])
    await user.call("post", "/v1/secrets", {"name": "known", "data": {"K": value}})
    status, body = await user.call("post", "/v1/instances", {"secrets": ["known", "ghost", "phantom"]})
    assert status == 422
    assert body["detail"] == "unknown secrets: ghost, phantom"
    assert body["missing_secrets"] == ["ghost", "phantom"]
    assert await count(sessions, Instance) == 0
    assert await count(sessions, Event) == 0
    assert provider.calls == []


async def test_another_users_secret_cannot_be_injected(app: Sanic, sessions: Sessions,
                                                       provider: FakeProvider) -> None:
    value = marker("alice")
    alice = Client(app, await make_tenant(sessions, "acme"), [value])
    await alice.call("post", "/v1/secrets", {"name": "private", "data": {"K": value}})
    await admin.create_user(sessions, "bob@acme.example", "acme")
    bob = Client(app, Tenant("acme", "bob@acme.example", await admin.create_token(sessions, "bob@acme.example"),
                             ""), [value])
    status, body = await bob.call("post", "/v1/instances", {"secrets": ["private"]})
    assert status == 422 and body["detail"] == "unknown secret: private"
    assert provider.calls == []


async def test_two_secrets_setting_one_key_fail_the_create(app: Sanic, sessions: Sessions,
                                                          provider: FakeProvider) -> None:
    a, b = marker("a"), marker("b")
    user = Client(app, await make_tenant(sessions, "acme"), [a, b])
    await user.call("post", "/v1/secrets", {"name": "one", "data": {"TOKEN": a}})
    await user.call("post", "/v1/secrets", {"name": "two", "data": {"TOKEN": b}})
    status, body = await user.call("post", "/v1/instances", {"secrets": ["one", "two"]})
    assert status == 422 and body["detail"] == "secrets one and two both set TOKEN; pick one of them"
    assert await count(sessions, Instance) == 0



async def test_a_secret_named_twice_fails_the_create(app: Sanic, sessions: Sessions, provider: FakeProvider) -> None:
    """`--secrets gh,gh` was stored and listed twice; it is refused naming the field, and nothing is made."""
    value = marker("gh")
    user = Client(app, await make_tenant(sessions, "acme"), [value])
    await user.call("post", "/v1/secrets", {"name": "gh", "data": {"GH_TOKEN": value}})
    status, body = await user.call("post", "/v1/instances", {"secrets": ["gh", "gh"]})
    assert status == 422 and body["detail"] == "secrets: named more than once: gh", body
    assert await count(sessions, Instance) == 0 and provider.calls == []
    status, body = await user.call("post", "/v1/instances", {"secrets": ["gh"]})
    assert status == 201 and body["secrets"] == ["gh"]

@both_databases
async def test_unreadable_secret_fails_the_create_closed(app: Sanic, sessions: Sessions, provider: FakeProvider,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    value = marker("tampered")
    user = Client(app, await make_tenant(sessions, "acme"), [value])
    await user.call("post", "/v1/secrets", {"name": "broken", "data": {"K": value}})
    async with sessions() as db:
        row = await db.scalar(select(SecretRow))
        assert row is not None
        flipped = bytes([row.ciphertext[0] ^ 0x80]) + row.ciphertext[1:]
        await db.execute(update(SecretRow).values(ciphertext=flipped))
        await db.commit()
    status, body = await user.call("post", "/v1/instances", {"secrets": ["broken"]})
    assert status == 500 and body["code"] == "secret_unreadable"
    assert "broken" in body["detail"] and row.key_id in body["detail"]
    assert await count(sessions, Instance) == 0 and provider.calls == []

    async with sessions() as db:
        await db.execute(update(SecretRow).values(ciphertext=row.ciphertext, key_id="retired"))
        await db.commit()
    status, body = await user.call("post", "/v1/instances", {"secrets": ["broken"]})
    assert status == 500 and body["key_id"] == "retired"
    assert "key id 'retired', which is not configured" in body["detail"]
    assert_no_value_logged(caplog, [value])
