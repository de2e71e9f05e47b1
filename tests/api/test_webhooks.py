"""Webhooks over HTTP with real receivers: signed deliveries, retries, the log, the URL rule, durability."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sanic import Sanic
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import admin, metrics, schemas
from api.credentials.secrets_box import SecretsBox
from api.db.base import utcnow
from api.db.engine import create_engine, session_factory
from api.db.models import Webhook, WebhookDelivery
from api.instances.providers.fake import FakeProvider
from api.jobs.scheduler import LifecycleScheduler
from api.settings import Settings
from api.webhooks import policy
from api.webhooks.delivery import UNREACHED, Deliverer
from api.webhooks.service import WebhookService
from tests.api.lifecycle_support import principal
from tests.api.test_internal import beat, new_session
from tests.conftest import Tenant, both_databases, make_tenant
from tests.webhook_receiver import Receiver, self_signed

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback receivers over http are allowed; retries come quickly (the rule's numbers, scaled down)."""
    return settings.model_copy(update={
        "require_schema_head": False, "webhook_allow_hosts": "127.0.0.1", "webhook_retry_base_s": 0.05,
        "webhook_retry_max_s": 0.2, "webhook_max_attempts": 3, "webhook_poll_s": 0.05, "webhook_timeout_s": 2.0})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
async def deliverer(settings: Settings, sessions: Sessions) -> AsyncIterator[Deliverer]:
    d = Deliverer(settings, sessions, SecretsBox.from_settings(settings))
    yield d
    await d.stop()


async def create_hook(app: Sanic, t: Tenant, url: str, **body: object) -> dict:
    _, resp = await app.asgi_client.post("/v1/webhooks", json={"url": url, **body}, headers=t.headers)
    assert resp.status == 201, resp.text
    return resp.json


def attempts(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("orz_webhook_attempts_total", {"result": result}) or 0.0


async def drain(deliverer: Deliverer, sessions: Sessions, done: int, timeout: float = 15) -> list[WebhookDelivery]:
    """Run delivery passes until ``done`` deliveries are finished (delivered or failed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await deliverer.run_once()
        async with sessions() as db:
            rows = list(await db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))
        if sum(r.state != "pending" for r in rows) >= done:
            return rows
        assert loop.time() < deadline, [(r.event, r.state, r.attempts, r.last_error) for r in rows]
        await asyncio.sleep(0.05)


@both_databases
async def test_an_agent_needing_input_is_posted_signed_and_retried_after_a_500(
        app: Sanic, sessions: Sessions, provider: FakeProvider, receiver: Receiver, deliverer: Deliverer) -> None:
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url, format="json")
    receiver.secret = hook["secret"]
    receiver.statuses = [500]
    sid, runner = await new_session(app, t, provider)
    assert (await beat(app, sid, runner, agent_state="working")).status == 200  # not asked for by default
    assert (await beat(app, sid, runner, agent_state="needs_input", agent_message="which database?")).status == 200

    [row] = await drain(deliverer, sessions, done=1)
    assert row.state == "delivered" and row.attempts == 2
    assert len(receiver.got) == 2 and all(r.verified for r in receiver.got)
    first, second = receiver.got
    assert first.body == second.body  # the same body, so the receiver can dedupe on the delivery id
    assert second.headers["x-orz-delivery"] == row.id and second.headers["x-orz-event"] == "agent.needs_input"
    payload = second.json
    assert payload["event"] == "agent.needs_input" and payload["session"]["id"] == sid
    assert payload["agent"] == {"state": "needs_input", "message": "which database?", "exit_code": None}
    assert "needs your input: which database?" in payload["text"]

    _, log = await app.asgi_client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=t.headers)
    [entry] = log.json["deliveries"]
    assert entry["state"] == "delivered" and entry["event"] == "agent.needs_input" and entry["status_code"] == 200
    assert [(a["attempt"], a["status_code"]) for a in entry["log"]] == [(1, 500), (2, 200)]
    assert "500" in entry["log"][0]["error"]
    # Times as the API writes all others (docs/webhooks.md): UTC with a Z, which strict RFC 3339 parsers need.
    _, inst = await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    for stamp in (payload["at"], entry["log"][0]["at"], inst.json["created_at"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp


@both_databases
async def test_a_receiver_that_keeps_failing_is_given_up_after_the_last_attempt(
        app: Sanic, sessions: Sessions, provider: FakeProvider, receiver: Receiver, deliverer: Deliverer) -> None:
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url, format="slack", events=["session.failed"])
    receiver.secret = hook["secret"]
    receiver.statuses = [503, 429, 502, 200]
    sid, runner = await new_session(app, t, provider)
    await beat(app, sid, runner, fatal_error="the runner could not clone the repository")
    before = {r: attempts(r) for r in ("retry", "failed")}

    [row] = await drain(deliverer, sessions, done=1)
    assert {r: attempts(r) - before[r] for r in before} == {"retry": 2, "failed": 1}
    assert row.state == "failed" and row.attempts == 3 and len(receiver.got) == 3
    assert "gave up after 3 attempts" in (row.last_error or "")
    text = receiver.got[0].json["text"]
    assert text.startswith(f"Session {sid}") and "failed: the runner could not clone" in text
    _, log = await app.asgi_client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=t.headers)
    assert [a["status_code"] for a in log.json["deliveries"][0]["log"]] == [503, 429, 502]


@both_databases
async def test_a_disabled_users_webhooks_hear_nothing_more(
        app: Sanic, sessions: Sessions, provider: FakeProvider, receiver: Receiver, deliverer: Deliverer) -> None:
    # Disabled because they left (or a token leaked): their sessions live on for the org, and what the
    # agents there say must not keep reaching a URL the disabled person controls.
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url, format="json")
    sid, runner = await new_session(app, t, provider)
    assert (await beat(app, sid, runner, agent_state="needs_input", agent_message="the prod password?")).status == 200
    await admin.set_user_active(sessions, t.email, False)  # after the first event was queued, before it is sent
    assert (await beat(app, sid, runner, agent_state="idle")).status == 200

    [row] = await drain(deliverer, sessions, done=1)
    assert row.event == "agent.needs_input" and row.state == "failed" and row.attempts == 1
    assert "owner is disabled" in (row.last_error or "")
    assert receiver.got == []
    assert hook["id"] == row.webhook_id


async def test_a_refusing_receiver_is_not_retried(
        app: Sanic, sessions: Sessions, provider: FakeProvider, receiver: Receiver, deliverer: Deliverer) -> None:
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url)
    receiver.secret = hook["secret"]
    receiver.statuses = [410]
    _, resp = await app.asgi_client.post(f"/v1/webhooks/{hook['id']}/test", headers=t.headers)
    assert resp.status == 200
    assert resp.json["state"] == "failed" and resp.json["status_code"] == 410 and resp.json["attempts"] == 1
    assert len(receiver.got) == 1 and receiver.got[0].verified
    assert receiver.got[0].json["event"] == "webhook.test"


@both_databases
async def test_test_deliveries_are_limited_per_user_with_retry_after(
        app: Sanic, sessions: Sessions, receiver: Receiver, deliverer: Deliverer) -> None:
    """Each test is one outbound POST made at once: a user gets a few a minute (ORZ_WEBHOOK_TEST_LIMIT),
    across all their webhooks, then a 429 problem saying when to try again; the receiver hears no more."""
    t = await make_tenant(sessions, "acme")
    other = await make_tenant(sessions, "globex")
    hook = await create_hook(app, t, receiver.url)
    second = await create_hook(app, t, receiver.url)
    limit = 10  # ORZ_WEBHOOK_TESTS_PER_MINUTE, the default
    for n in range(limit):
        _, resp = await app.asgi_client.post(f"/v1/webhooks/{(hook, second)[n % 2]['id']}/test", headers=t.headers)
        assert resp.status == 200, resp.text
    for target in (hook, second):  # another of the same user's webhooks is no way around it
        _, refused = await app.asgi_client.post(f"/v1/webhooks/{target['id']}/test", headers=t.headers)
        assert refused.status == 429, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json["code"] == "rate_limited" and "test deliveries" in refused.json["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60 and refused.json["retry_after_s"] >= 1
    # Nor is a webhook made afresh (deleting one does not forget its tests).
    assert (await app.asgi_client.delete(f"/v1/webhooks/{second['id']}", headers=t.headers))[1].status == 204
    fresh = await create_hook(app, t, receiver.url)
    _, refused = await app.asgi_client.post(f"/v1/webhooks/{fresh['id']}/test", headers=t.headers)
    assert refused.status == 429, refused.text
    assert len(receiver.got) == limit
    # Someone else is not held back by it.
    theirs = await create_hook(app, other, receiver.url)
    _, resp = await app.asgi_client.post(f"/v1/webhooks/{theirs['id']}/test", headers=other.headers)
    assert resp.status == 200, resp.text


@both_databases
async def test_the_secret_is_shown_once_and_only_to_its_owner(
        app: Sanic, sessions: Sessions, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = await make_tenant(sessions, "acme")
    other = await make_tenant(sessions, "other")
    hook = await create_hook(app, t, receiver.url, description="team channel")
    secret = hook["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert hook["events"] == ["agent.needs_input", "agent.idle", "agent.exited", "session.failed"]
    receiver.secret = secret
    for path in ("/v1/webhooks", f"/v1/webhooks/{hook['id']}", f"/v1/webhooks/{hook['id']}/deliveries"):
        _, resp = await app.asgi_client.get(path, headers=t.headers)
        assert resp.status == 200 and secret not in resp.text
    _, ping = await app.asgi_client.post(f"/v1/webhooks/{hook['id']}/test", headers=t.headers)
    assert ping.json["state"] == "delivered" and secret not in ping.text and receiver.got[0].verified
    async with sessions() as db:
        row = await db.scalar(select(Webhook))
        assert row is not None and secret.encode() not in row.ciphertext
    _, resp = await app.asgi_client.get(f"/v1/webhooks/{hook['id']}", headers=other.headers)
    assert resp.status == 404
    _, resp = await app.asgi_client.delete(f"/v1/webhooks/{hook['id']}", headers=other.headers)
    assert resp.status == 404
    _, resp = await app.asgi_client.delete(f"/v1/webhooks/{hook['id']}", headers=t.headers)
    assert resp.status == 204
    _, resp = await app.asgi_client.get("/v1/webhooks", headers=t.headers)
    assert resp.json == {"webhooks": []}
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert hook["id"] in logged and secret not in logged


@pytest.mark.parametrize(("url", "says"), [
    ("https://10.1.2.3/hook", policy.REFUSED),
    ("https://[::1]:8443/hook", policy.REFUSED),
    ("https://127.0.0.2/hook", policy.REFUSED),  # loopback, but not the allowed 127.0.0.1
    ("https://169.254.169.254/latest", policy.REFUSED),
    ("https://[64:ff9b::a9fe:a9fe]/latest", policy.REFUSED),  # the metadata service through NAT64
    ("http://hooks.slack.com/services/x", policy.REFUSED),
    # A name the server's DNS does not resolve (hooks.slack.com during an outage): the same answer, which
    # says the server must resolve it rather than calling the URL not public.
    ("https://hooks.no-such-name.invalid/services/x", "public https:// address this server can resolve"),
    ("ftp://example.com/x", "https:// URL"),
    ("https://user:pw@example.com/x", "user name or password"),
])
async def test_webhook_urls_follow_the_private_address_rule(app: Sanic, sessions: Sessions, url: str,
                                                          says: str) -> None:
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/webhooks", json={"url": url}, headers=t.headers)
    assert resp.status == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json["code"] == "webhook_url_refused" and says in resp.json["detail"]


async def _deliver_after_rebinding(settings: Settings, sessions: Sessions, receiver: Receiver,
                                   answers: dict[str, list[str]], later: list[str], org: str = "acme"
                                   ) -> WebhookDelivery:
    """A webhook to hooks.example.com made while DNS (the ``answers`` table) says one thing, then a test
    delivery once it answers ``later``: the delivery's row."""
    async def resolve(host: str) -> list[str]:
        return answers.get(host, [])

    who = await principal(sessions, org)
    box = SecretsBox.from_settings(settings)
    d = Deliverer(settings, sessions, box, resolve=resolve)
    svc = WebhookService(settings, sessions, box, d, resolve=resolve)
    try:
        created = await svc.create(who, schemas.WebhookCreate(url=f"https://hooks.example.com:{receiver.port}/x"))
        answers["hooks.example.com"] = later
        return await svc.test(who, created.id)
    finally:
        await d.stop()


async def test_a_name_that_rebinds_to_a_private_address_is_refused_at_delivery(
        settings: Settings, sessions: Sessions, receiver: Receiver) -> None:
    """The table stands in for DNS that answered a public address at creation and a private one later."""
    row = await _deliver_after_rebinding(settings, sessions, receiver, {"hooks.example.com": ["93.184.216.34"]},
                                         ["10.0.0.7"])
    assert (row.state, row.attempts, row.last_error) == ("pending", 1, policy.REFUSED)  # checked again next time
    assert receiver.got == []


async def test_refusals_do_not_tell_internal_names_from_unknown_ones(
        settings: Settings, sessions: Sessions, caplog: pytest.LogCaptureFixture) -> None:
    """An oracle for the operator's network, closed: a name the server's DNS maps to a private address, a name
    it does not know, a private address, plain http and the server's own (internal) door answer alike; the
    server's log keeps which it was."""
    async def resolve(host: str) -> list[str]:
        return {"db.corp.internal": ["10.9.8.7"], "hooks.example.com": ["93.184.216.35"]}.get(host, [])

    caplog.set_level(logging.INFO, logger="api.webhooks.policy")
    settings = settings.model_copy(update={"internal_api_url": "http://127.0.0.1:9"})  # loopback http is allowed
    box = SecretsBox.from_settings(settings)
    d = Deliverer(settings, sessions, box, resolve=resolve)
    svc = WebhookService(settings, sessions, box, d, resolve=resolve)
    who = await principal(sessions, "acme")
    answers = []
    for url in ("https://db.corp.internal/x", "https://no-such-name.corp.internal/x", "https://10.20.30.40/x",
                "http://hooks.example.com/x", f"{settings.internal_api_url}/v1/x"):
        with pytest.raises(policy.WebhookUrlRefused) as refused:
            await svc.create(who, schemas.WebhookCreate(url=url))
        answers.append(refused.value.to_problem())
    await d.stop()
    assert answers == [answers[0]] * 5 and answers[0]["detail"] == policy.REFUSED
    reasons = [r.__dict__.get("reason") for r in caplog.records if r.__dict__.get("event") == "webhook_url_refused"]
    assert reasons[:4] == [policy.NOT_PUBLIC, policy.UNRESOLVED, policy.NOT_PUBLIC, policy.PLAIN_HTTP], reasons
    assert reasons[4].startswith("this server itself (ORZ_INTERNAL_API_URL"), reasons


async def test_at_delivery_an_unknown_name_and_an_internal_one_fail_alike(
        settings: Settings, sessions: Sessions, receiver: Receiver) -> None:
    """A name rebound (a CNAME, say) to an internal name and one to nothing: the owner's delivery log reads the
    same, retried alike."""
    rows = []
    for org, later in (("acme", ["10.0.0.7"]), ("globex", [])):
        row = await _deliver_after_rebinding(settings, sessions, receiver,
                                             {"hooks.example.com": ["93.184.216.34"]}, later, org)
        rows.append((row.state, row.attempts, row.last_error, row.next_attempt_at is not None))
    assert rows[0] == rows[1], rows
    assert receiver.got == []


async def test_a_webhook_to_the_servers_own_api_is_refused(app: Sanic, sessions: Sessions,
                                                           settings: Settings) -> None:
    """127.0.0.1 is allowed for receivers here; the API's own port on it is still refused, naming the rule."""
    t = await make_tenant(sessions, "acme")
    own = settings.public_api_url  # http://127.0.0.1:<ORZ_API_PORT>, the embedded default
    _, resp = await app.asgi_client.post("/v1/webhooks", json={"url": f"{own}/v1/instances"}, headers=t.headers)
    assert resp.status == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json["code"] == "webhook_url_refused" and resp.json["detail"] == policy.REFUSED
    # Another port on the same address is someone else: allowed.
    other = f"http://127.0.0.1:{settings.api_port + 1}/x"
    _, resp = await app.asgi_client.post("/v1/webhooks", json={"url": other}, headers=t.headers)
    assert resp.status == 201, resp.text


PUBLIC = {"orz.example.com": ["93.184.216.34"], "alias.example.net": ["::ffff:93.184.216.34"],
          "hooks.example.com": ["93.184.216.35"]}


@pytest.mark.parametrize(("url", "setting"), [
    ("https://orz.example.com/v1/instances", "ORZ_PUBLIC_API_URL"),
    ("https://ORZ.example.com:443/x", "ORZ_PUBLIC_API_URL"),
    ("https://alias.example.net/x", "ORZ_PUBLIC_API_URL"),  # another name for the same address
    ("https://93.184.216.34/x", "ORZ_PUBLIC_API_URL"),
    ("https://orz.example.com:8443/s/x", "ORZ_PUBLIC_WEB_URL"),
    (None, None),  # hooks.example.com: someone else
])
async def test_the_servers_public_names_and_addresses_are_refused(
        settings: Settings, sessions: Sessions, url: str | None, setting: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="api.webhooks.policy")
    own = settings.model_copy(update={"public_api_url": "https://orz.example.com",
                                      "public_web_url": "wss://orz.example.com:8443"})

    async def resolve(host: str) -> list[str]:
        return PUBLIC.get(host, [])

    box = SecretsBox.from_settings(own)
    d = Deliverer(own, sessions, box, resolve=resolve)
    svc = WebhookService(own, sessions, box, d, resolve=resolve)
    who = await principal(sessions, "acme")
    try:
        if url is None:
            assert (await svc.create(who, schemas.WebhookCreate(url="https://hooks.example.com/x"))).id
            return
        with pytest.raises(policy.WebhookUrlRefused) as refused:
            await svc.create(who, schemas.WebhookCreate(url=url))
    finally:
        await d.stop()
    assert refused.value.detail == policy.REFUSED
    assert f"this server itself ({setting} is " in caplog.text  # the server's log says which door


async def test_a_name_that_rebinds_to_the_server_itself_is_refused_at_delivery(
        settings: Settings, sessions: Sessions, receiver: Receiver) -> None:
    """DNS answered someone else's address at creation and the server's own public address later."""
    own = settings.model_copy(update={"public_api_url": f"https://orz.example.com:{receiver.port}"})
    row = await _deliver_after_rebinding(own, sessions, receiver, dict(PUBLIC), PUBLIC["orz.example.com"])
    assert (row.state, row.attempts, row.last_error) == ("pending", 1, policy.REFUSED)
    assert receiver.got == []


@both_databases
async def test_pending_deliveries_survive_a_restart_and_a_crashed_sender(
        app: Sanic, settings: Settings, sessions: Sessions, provider: FakeProvider, receiver: Receiver,
        caplog: pytest.LogCaptureFixture) -> None:
    """The receiver is down at first; the first sender 'dies' holding a claim; a new process delivers."""
    caplog.set_level(logging.INFO, logger="api.webhooks.delivery")
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url, events=["agent.needs_input", "agent.idle"])
    receiver.secret = hook["secret"]
    receiver.stop()
    sid, runner = await new_session(app, t, provider)
    await beat(app, sid, runner, agent_state="needs_input", agent_message="one")
    await beat(app, sid, runner, agent_state="idle")

    box = SecretsBox.from_settings(settings)
    first = Deliverer(settings, sessions, box)
    assert await first.run_once() == 2  # connection refused: both wait for a retry
    async with sessions() as db:
        rows = list(await db.scalars(select(WebhookDelivery)))
    assert {(r.state, r.attempts) for r in rows} == {("pending", 1)}
    # The receiver is on an address only ORZ_WEBHOOK_ALLOW_HOSTS lets through: the owner reads one sentence,
    # the server's log says what happened.
    assert all(r.last_error == UNREACHED for r in rows) and "ConnectError" in caplog.text
    # Nor does its log's duration tell refused (a millisecond) from a TLS failure or a time-out.
    assert [r.log[-1]["duration_ms"] for r in rows] == [None, None], [r.log for r in rows]
    # It claims them again when due, then its process dies before sending: the claim stays behind.
    await asyncio.sleep(0.3)
    assert len(await first.claim(10)) == 2
    await first.stop()

    receiver.start()
    engine = create_engine(settings.database_url)  # a new process: its own connections
    try:
        fresh = session_factory(engine)
        later = Deliverer(settings, fresh, box)
        assert await later.run_once() == 0  # the dead sender's claim has not expired yet
        async with fresh() as db:
            await db.execute(update(WebhookDelivery).values(claimed_until=utcnow() - timedelta(seconds=1)))
            await db.commit()
        rows = await drain(later, fresh, done=2)
        await later.stop()
    finally:
        await engine.dispose()
    assert [(r.event, r.state, r.attempts) for r in rows] == [("agent.needs_input", "delivered", 2),
                                                              ("agent.idle", "delivered", 2)]
    assert sorted(r.json["event"] for r in receiver.got) == ["agent.idle", "agent.needs_input"]
    assert all(r.verified for r in receiver.got)


@both_databases
async def test_two_senders_send_each_delivery_once(
        app: Sanic, settings: Settings, sessions: Sessions, provider: FakeProvider, receiver: Receiver) -> None:
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url, events=["agent.needs_input", "agent.idle", "agent.working"])
    receiver.secret = hook["secret"]
    sid, runner = await new_session(app, t, provider)
    for i in range(4):
        await beat(app, sid, runner, agent_state="needs_input", agent_message=f"question {i}")
        await beat(app, sid, runner, agent_state="working")
    box = SecretsBox.from_settings(settings)
    engines = [create_engine(settings.database_url) for _ in range(2)]
    senders = [Deliverer(settings, session_factory(e), box) for e in engines]
    try:
        for _ in range(5):
            await asyncio.gather(*(s.run_once(limit=3) for s in senders))
    finally:
        for s in senders:
            await s.stop()
        for e in engines:
            await e.dispose()
    ids = [r.headers["x-orz-delivery"] for r in receiver.got]
    assert len(ids) == 8 and len(set(ids)) == 8


async def tls_test_pings(settings: Settings, sessions: Sessions, tmp_path: Path, certificate_name: str,
                         hooks: list[tuple[Any, str]], *, keep_alive: bool = False) -> tuple[Receiver, list[Any]]:
    """For each (principal, host) in turn, a webhook at https://<host>:<port>/x and its test ping, through a
    deliverer that trusts only a certificate naming ``certificate_name``; a table stands in for DNS and sends every
    host to the receiver on 127.0.0.1, which checks signatures with the first webhook's secret. Returns the
    (stopped) receiver and each ping's delivery row."""
    server_tls, client_tls = self_signed(tmp_path, certificate_name)
    receiver = Receiver(tls=server_tls, keep_alive=keep_alive).start()
    hosts = {host for _, host in hooks}

    async def resolve(host: str) -> list[str]:
        return ["127.0.0.1"] if host in hosts else []

    box = SecretsBox.from_settings(settings)
    d = Deliverer(settings, sessions, box, resolve=resolve, transport=httpx.AsyncHTTPTransport(verify=client_tls))
    svc = WebhookService(settings, sessions, box, d, resolve=resolve)
    rows = []
    try:
        for who, host in hooks:
            created = await svc.create(who, schemas.WebhookCreate(url=f"https://{host}:{receiver.port}/x"))
            receiver.secret = receiver.secret or created.secret
            rows.append(await svc.test(who, created.id))
    finally:
        await d.stop()
        receiver.stop()
    return receiver, rows


async def test_https_goes_to_the_checked_address_and_verifies_the_urls_name(
        settings: Settings, sessions: Sessions, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The certificate names hooks.example.com, the socket is 127.0.0.1; the same address under a name the
    certificate does not carry is refused by TLS."""
    caplog.set_level(logging.INFO, logger="api.webhooks.delivery")
    who = await principal(sessions, "acme")
    receiver, (row, wrong) = await tls_test_pings(settings, sessions, tmp_path, "hooks.example.com",
                                                  [(who, "hooks.example.com"), (who, "other.example.com")])
    assert row.state == "delivered", row.last_error
    assert wrong.state == "pending" and wrong.last_error == UNREACHED, wrong.last_error
    assert "certificate" in caplog.text.lower()  # an allowed (loopback) address: the detail is in the log
    [got] = receiver.got
    assert got.verified and got.headers["host"] == f"hooks.example.com:{receiver.port}"


def test_backoff_doubles_with_jitter_up_to_the_cap(settings: Settings) -> None:
    d = Deliverer(settings.model_copy(update={"webhook_retry_base_s": 1.0, "webhook_retry_max_s": 10.0}),
                  None, None)  # type: ignore[arg-type]  # backoff reads only the settings
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        waits = [d.backoff(attempt) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > full / 10  # spread, so receivers are not hit in lockstep
    assert d.backoff(1, retry_after_s=7) >= 7 and d.backoff(1, retry_after_s=3600) <= 10.0


async def test_the_scheduler_sends_deliveries(settings: Settings, sessions: Sessions, app: Sanic,
                                              provider: FakeProvider, receiver: Receiver) -> None:
    t = await make_tenant(sessions, "acme")
    hook = await create_hook(app, t, receiver.url)
    receiver.secret = hook["secret"]
    sched = LifecycleScheduler(settings, sessions, provider)
    sched.start()
    try:
        sid, runner = await new_session(app, t, provider)
        await beat(app, sid, runner, agent_state="exited", agent_exit_code=3)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not receiver.got:
            assert loop.time() < deadline, "the scheduler sent nothing"
            await asyncio.sleep(0.05)
    finally:
        await sched.stop()
    assert receiver.got[0].verified
    assert receiver.got[0].json["agent"] == {"state": "exited", "message": None, "exit_code": 3}
    assert receiver.got[0].json["text"].endswith("the agent exited with code 3")


class HostileReceiver:
    """A receiver on a free port that answers 200 and then never finishes: ``flood`` sends body bytes as fast
    as the client takes them (up to ``cap``), ``drip`` sends a header line one byte at a time, forever."""

    def __init__(self, mode: str, cap: int = 64 << 20) -> None:
        self.mode, self.cap = mode, cap
        self.sent = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> HostileReceiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.mode == "flood":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.cap)
                chunk = b"x" * (1 << 20)
                while self.sent < self.cap:
                    writer.write(chunk)
                    await writer.drain()
                    self.sent += len(chunk)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
                while True:
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.2)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def test_a_receiver_streaming_an_endless_answer_is_not_read(
        app: Sanic, sessions: Sessions, caplog: pytest.LogCaptureFixture) -> None:
    # Any user's webhook points where they like: an answer of gigabytes was read into the API's memory
    # (the test ping runs in the API process), and a receiver dripping bytes held the attempt (and the
    # scheduler's whole batch) forever, since httpx's time-out is per read. The status is all we need.
    caplog.set_level(logging.INFO, logger="api.webhooks.delivery")
    t = await make_tenant(sessions, "acme")
    async with HostileReceiver("flood") as flood, HostileReceiver("drip") as drip:
        hook = await create_hook(app, t, flood.url)
        _, resp = await asyncio.wait_for(app.asgi_client.post(f"/v1/webhooks/{hook['id']}/test", headers=t.headers),
                                         60)
        assert resp.status == 200 and resp.json["state"] == "delivered", resp.json
        assert flood.sent < flood.cap // 2  # the body was never read (what the sockets buffer at most)

        slow = await create_hook(app, t, drip.url)
        _, resp = await asyncio.wait_for(app.asgi_client.post(f"/v1/webhooks/{slow['id']}/test", headers=t.headers),
                                         60)
        assert resp.status == 200 and resp.json["state"] == "pending", resp.json
        assert resp.json["error"] == UNREACHED and "within 2 s" in caplog.text, resp.json


async def test_a_connection_is_never_reused_for_another_webhooks_name(
        settings: Settings, sessions: Sessions, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Two names for one address, as on a host that routes TLS by name to different customers' servers: a kept
    connection, opened and verified for one tenant's webhook, carried another tenant's delivery (its events,
    signed) to the first tenant's server, its own name never checked."""
    caplog.set_level(logging.INFO, logger="api.webhooks.delivery")
    attacker, victim = await principal(sessions, "evil"), await principal(sessions, "acme")
    receiver, (first, second) = await tls_test_pings(
        settings, sessions, tmp_path, "attacker.example.com",
        [(attacker, "attacker.example.com"), (victim, "victim.example.com")], keep_alive=True)
    assert first.state == "delivered", first.last_error
    assert second.state == "pending" and second.last_error == UNREACHED, second.last_error
    assert "certificate" in caplog.text.lower()
    assert [r.headers["host"] for r in receiver.got] == [f"attacker.example.com:{receiver.port}"]


def test_the_docs_verify_accepts_a_delivery_however_its_framework_cases_the_headers() -> None:
    """docs/webhooks.md's verify(), as written: an ASGI app hands it lowercase names (Starlette's
    dict(request.headers)), others the names as sent; a wrong secret or an old timestamp is refused."""
    import time
    from pathlib import Path

    from api.webhooks.delivery import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature

    text = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text(encoding="utf-8")
    [code] = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify(" in block]
    scope: dict[str, object] = {}
    exec(compile(code, "docs/webhooks.md", "exec"), scope)  # noqa: S102  # nosec B102  # our own doc's example
    verify = scope["verify"]
    body, now = b'{"event": "agent.needs_input"}', int(time.time())
    sent = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: signature("whsec_x", now, body)}
    assert verify("whsec_x", sent, body)  # type: ignore[operator]
    assert verify("whsec_x", {k.lower(): v for k, v in sent.items()}, body)  # type: ignore[operator]
    assert not verify("whsec_other", sent, body)  # type: ignore[operator]
    old = {TIMESTAMP_HEADER: str(now - 3600), SIGNATURE_HEADER: signature("whsec_x", now - 3600, body)}
    assert not verify("whsec_x", old, body)  # type: ignore[operator]


async def test_an_allowed_internal_receiver_that_fails_reads_the_same_whatever_failed(
        settings: Settings, sessions: Sessions, caplog: pytest.LogCaptureFixture) -> None:
    """ORZ_WEBHOOK_ALLOW_HOSTS lets an in-cluster receiver through (here 127.0.0.1): refused, closed at once and
    not TLS each told the owner which ports of that network answer. One sentence for the owner, the detail
    in the server's log; a public receiver's owner keeps httpx's words."""
    import socket

    caplog.set_level(logging.INFO, logger="api.webhooks.delivery")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    open_port = server.sockets[0].getsockname()[1]
    box = SecretsBox.from_settings(settings)
    d = Deliverer(settings, sessions, box)
    svc = WebhookService(settings, sessions, box, d)
    errors = []
    try:
        for org, url in (("acme", f"http://127.0.0.1:{closed}/x"), ("globex", f"http://127.0.0.1:{open_port}/x"),
                         ("initech", f"https://127.0.0.1:{open_port}/x")):
            who = await principal(sessions, org)
            created = await svc.create(who, schemas.WebhookCreate(url=url))
            row = await svc.test(who, created.id)
            errors.append((row.state, row.last_error))
    finally:
        await d.stop()
        server.close()
        await server.wait_closed()
    assert errors == [("pending", UNREACHED)] * 3, errors
    details = [r.getMessage() for r in caplog.records if r.__dict__.get("event") == "webhook_unreached"]
    assert len(details) == 3 and "ConnectError" in details[0], details
    public = policy.Target("https", "hooks.example.com", 443, ["93.184.216.35"])
    claimed = type("C", (), {"webhook_id": "wh_x", "id": "whd_x"})()
    assert Deliverer._unreached(claimed, public, "ConnectError: refused") == "ConnectError: refused"  # type: ignore[arg-type]
