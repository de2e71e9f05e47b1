"""Fixtures of the sign-in tests: the stand-in providers and an API configured to sign in with them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sanic import Sanic
from sanic_testing.testing import TestingResponse

from api import admin
from api.app import create_app
from api.settings import Settings
from tests.signin.standins import GitHubStandIn, OidcStandIn

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@pytest.fixture
async def oidc() -> AsyncIterator[OidcStandIn]:
    server = OidcStandIn()
    await server.start_here()
    try:
        yield server
    finally:
        await server.stop_here()


@pytest.fixture
async def github() -> AsyncIterator[GitHubStandIn]:
    server = GitHubStandIn()
    await server.start_here()
    try:
        yield server
    finally:
        await server.stop_here()


def signin_settings(base: Settings, oidc: OidcStandIn | None = None, github: GitHubStandIn | None = None,
                    **extra: Any) -> Settings:
    update: dict[str, Any] = {"signin_new_users": "create", "oidc_name": "Test IdP"}
    if oidc is not None:
        update.update(oidc_issuer=oidc.url, oidc_client_id=oidc.client_id, oidc_client_secret=oidc.client_secret)
    if github is not None:
        update.update(github_client_id=github.client_id, github_base_url=github.url)
    update.update(extra)
    # Through the constructor, so derived values (github_api_url) and validators apply.
    return Settings(**{**base.model_dump(), "github_api_url": "", **update})


def make_app(settings: Settings) -> Sanic:
    from api.instances.providers.fake import FakeProvider

    return create_app(settings, provider=FakeProvider())


@pytest.fixture
async def default_org(sessions: Any) -> str:
    await admin.create_org(sessions, "default", "free")
    return "default"


async def start(app: Sanic, provider: str | None = None) -> dict[str, Any]:
    _, resp = await app.asgi_client.post("/v1/auth/device", json={"provider": provider} if provider else {})
    assert resp.status == 200, resp.json
    return resp.json


async def poll(app: Sanic, device_code: str) -> TestingResponse:
    _, resp = await app.asgi_client.post("/v1/auth/token", json={"grant_type": DEVICE_GRANT,
                                                                 "device_code": device_code})
    return resp


def tmp_settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, provider="fake", log_json=False)
