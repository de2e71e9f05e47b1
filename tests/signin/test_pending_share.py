"""Sign-ins in progress are bounded (the start routes take no credential), and each address (an IPv6 client
as its /64) has a bounded share of them: a flood from one address ends its own pending sign-ins, never a
person's who started from elsewhere."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from api.db.models import DeviceGrant, SigninState
from tests.conftest import both_databases
from tests.signin.conftest import make_app, signin_settings
from tests.signin.standins import OidcStandIn

pytestmark = pytest.mark.usefixtures("default_org")
SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}
CALLBACK = "https://web.example.com/s/callback"


@both_databases
async def test_one_address_cannot_evict_the_pending_sign_ins_of_others(settings, oidc: OidcStandIn, sessions,
                                                                       monkeypatch):
    from api.signin import service

    monkeypatch.setattr(service, "MAX_PENDING", 5)
    monkeypatch.setattr(service, "MAX_PENDING_PER_SOURCE", 2)
    app = make_app(signin_settings(settings, oidc, public_web_url="https://web.example.com"))

    async def start_browser(address: str) -> dict[str, str]:
        _, resp = await app.asgi_client.post("/internal/v1/signin/start", headers=SERVICE, json={
            "redirect_uri": CALLBACK, "source_address": address})
        assert resp.status == 200, resp.json
        return dict(resp.json)

    async def finish(started: dict[str, str], address: str):  # type: ignore[no-untyped-def]
        code = oidc.authorize(started["authorization_url"], email="ada@example.com")
        _, resp = await app.asgi_client.post("/internal/v1/signin/finish", headers=SERVICE, json={
            "state": started["state"], "code": code, "redirect_uri": CALLBACK, "source_address": address})
        return resp

    ada = await start_browser("192.0.2.10")
    # One IPv6 client rotating through its /64, more starts than the whole table holds: it keeps its share.
    flood = [await start_browser(f"2001:db8:1:2::{n + 1}") for n in range(8)]
    async with sessions() as db:
        by_source = dict((await db.execute(select(SigninState.source, func.count())
                                           .group_by(SigninState.source))).all())
    assert by_source == {"192.0.2.10": 1, "2001:db8:1:2::/64": 2}, by_source
    # Its oldest went, its newest wait.
    assert (await finish(flood[0], "2001:db8:1:2::1")).json["code"] == "invalid_grant"
    assert (await finish(flood[-1], "2001:db8:1:2::1")).status == 200
    # The table full of addresses each within its share (1 + 2 + 2 = 5): the next start makes room from an
    # address holding the most, not from ada's.
    await start_browser("2001:db8:1:2::7")
    await start_browser("2001:db8:1:2::8")
    await start_browser("198.51.100.7")
    await start_browser("198.51.100.7")
    await start_browser("203.0.113.9")
    async with sessions() as db:
        assert await db.scalar(select(func.count()).select_from(SigninState)) == 5
        assert await db.scalar(select(func.count()).select_from(DeviceGrant)) == 0
    done = await finish(ada, "192.0.2.10")
    assert done.status == 200 and done.json["access_token"].startswith("orz_"), done.json
