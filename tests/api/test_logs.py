"""JSON logs: every line of a full API flow over real HTTP is one JSON object carrying the request id
(and the session and user ids where they apply), and no credential or secret value the flow handled
shows up in any log line, at any level."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import asyncssh
import httpx
import pytest
from sanic import Sanic

from api import log as orz_log
from api.instances.providers.fake import FakeProvider
from api.serve import ApiServer
from tests.conftest import make_tenant

SERVICE_TOKEN = "svc-test-token-0123456789"
CLIENT_LOGGERS = {"httpx", "httpcore"}
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLE runner"


@contextmanager
def captured_logs(level: int, formatter: logging.Formatter | None = None) -> Iterator[io.StringIO]:
    """Everything any logger emits, through the production JSON formatter (or `formatter`), on the root
    handler."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(formatter or orz_log.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
async def server(app: Sanic) -> AsyncIterator[str]:
    srv = await ApiServer.start(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.port}"
    finally:
        await srv.stop()


async def full_flow(base: str, sessions, provider: FakeProvider) -> dict[str, str]:
    """Drive every kind of request once (and the usual mistakes); returns the credentials it handled."""
    t = await make_tenant(sessions, "acme")
    user = {"Authorization": f"Bearer {t.token}"}
    service = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    # Values that look like nothing the redacting formatter knows: only not logging them keeps them out.
    secret_values = {"first secret": "sk-live-" + secrets.token_hex(16), "second secret": secrets.token_hex(20),
                     "replaced secret": "hunter2-" + secrets.token_hex(8)}
    # One client, so requests share keep-alive connections as real clients do.
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        created = await http.post("/v1/secrets", headers=user, json={"name": "model-keys", "data": {
            "MODEL_API_KEY": secret_values["first secret"], "DB_PASSWORD": secret_values["second secret"]}})
        assert created.status_code == 201, created.text
        assert secret_values["first secret"] not in created.text
        replaced = await http.put("/v1/secrets/model-keys", headers=user, json={"data": {
            "MODEL_API_KEY": secret_values["replaced secret"], "DB_PASSWORD": secret_values["second secret"]}})
        assert replaced.status_code == 200, replaced.text
        # A bad request carrying a value: the error names the problem, not the value.
        bad = await http.post("/v1/secrets", headers=user, json={"name": "x", "data": {
            "not a name": secret_values["first secret"]}})
        assert bad.status_code in (400, 422) and secret_values["first secret"] not in bad.text
        sid = (await http.post("/v1/instances", json={"task": "fix the bug", "secrets": ["model-keys"]},
                               headers=user)).json()["id"]
        # The values did flow: into the session's environment, and nowhere else.
        assert provider.specs[sid].secret_env["MODEL_API_KEY"] == secret_values["replaced secret"]
        assert (await http.get("/v1/secrets/model-keys", headers=user)).status_code == 200
        runner_token = provider.specs[sid].runner_token
        # Attach credentials: a 5-minute certificate and a single-use JWT, both secrets while they live.
        user_key = asyncssh.generate_private_key("ssh-ed25519")
        grant = await http.post(f"/v1/instances/{sid}/attach", headers=user, json={
            "public_key": user_key.export_public_key().decode()})
        assert grant.status_code == 200, grant.text
        attach_token, certificate = grant.json()["token"], grant.json()["certificate"]
        runner = {"Authorization": f"Bearer {runner_token}"}
        beat = await http.post(f"/internal/v1/instances/{sid}/heartbeat", headers=runner, json={
            "host_key": HOST_KEY, "ssh_host": "127.0.0.1", "ssh_port": 40022, "init_status": "none"})
        assert beat.status_code == 200
        for path in ("/v1/instances", f"/v1/instances/{sid}", f"/v1/instances/{sid}/status",
                     f"/v1/instances/{sid}/logs", "/v1/me"):
            assert (await http.get(path, headers=user)).status_code == 200, path
        reply = await http.post("/internal/v1/authorize", headers=service, json={
            "session_id": sid, "user_id": t.user_id, "method": "certificate", "source_address": "127.0.0.1"})
        assert reply.status_code == 200 and reply.json()["route"]
        assert (await http.post("/internal/v1/attach-events", headers=service, json={
            "session_id": sid, "user_id": t.user_id, "event": "attached", "connection_id": "c-1",
            "source_address": "127.0.0.1"})).status_code in (200, 204)
        assert (await http.post(f"/v1/instances/{sid}/stop", headers=user)).status_code == 200
        assert (await http.post(f"/v1/instances/{sid}/start", headers=user)).status_code == 200
        second = (await http.post("/v1/instances", json={}, headers=user)).json()["id"]
        assert (await http.post("/v1/instances", json={}, headers=user)).status_code == 429
        # Mistakes: a wrong token that looks real, a bad body, an unknown session and endpoint.
        fake = {"Authorization": "Bearer orz_" + "Q" * 43}
        assert (await http.get("/v1/instances", headers=fake)).status_code == 401
        assert (await http.post("/v1/instances", content=b"{not json", headers=user)).status_code == 400
        assert (await http.get("/v1/instances/nope-000000", headers=user)).status_code == 404
        assert (await http.get("/v2/nothing")).status_code == 404
        provider.fail_next = "the provider fell over"
        assert (await http.delete(f"/v1/instances/{second}", headers=user)).status_code in (200, 503)
        assert (await http.delete(f"/v1/instances/{sid}", headers=user)).status_code == 200
        for path in ("/healthz", "/readyz", "/v1/openapi.json"):
            assert (await http.get(path)).status_code == 200, path
        assert (await http.delete("/v1/secrets/model-keys", headers=user)).status_code == 204
    return {"api token": t.token, "runner token": runner_token, "service token": SERVICE_TOKEN,
            "wrong token": fake["Authorization"].split()[1], "attach token": attach_token,
            "certificate": certificate.split()[1], **secret_values}


async def test_every_line_of_a_full_flow_is_json_with_a_request_id(server, sessions, provider):
    with captured_logs(logging.INFO) as buf:
        await full_flow(server, sessions, provider)
    lines = buf.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]  # every line parses
    # The test's own HTTP client logs into the same process; only the server's lines are judged.
    entries = [e for e in entries if e["logger"].split(".")[0] not in CLIENT_LOGGERS]
    assert len(entries) >= 20
    assert all(isinstance(e, dict) and e.get("request_id") for e in entries), [
        e for e in entries if not e.get("request_id")]
    access = [e for e in entries if e.get("event") == "access"]
    assert len(access) >= 20 and all({"method", "route", "status", "duration_ms"} <= e.keys() for e in access)
    # The caller and the session are named where they are known, never left over from another request.
    by_route = {(e["method"], e["route"], e["status"]): e for e in access}
    get_one = by_route[("GET", "/v1/instances/{id}", 200)]
    assert get_one["user_id"] and get_one["session_id"]
    assert by_route[("POST", "/v1/instances", 201)]["session_id"]
    # The gateway's calls name the end user and the session they are about.
    for internal in (("POST", "/internal/v1/authorize", 200), ("POST", "/internal/v1/attach-events", 204)):
        assert by_route[internal]["session_id"] and by_route[internal]["user_id"], internal
    for anonymous in (("GET", "/healthz", 200), ("GET", "/readyz", 200), ("GET", "unmatched", 404)):
        assert "user_id" not in by_route[anonymous] and "session_id" not in by_route[anonymous], anonymous
    # One request id per request: the access lines' ids are all different.
    assert len({e["request_id"] for e in access}) == len(access)


async def test_no_credential_appears_in_any_log_line(server, sessions, provider):
    # DEBUG on the root logger: every library's chatter is searched too, not just ours.
    with captured_logs(logging.DEBUG) as buf:
        creds = await full_flow(server, sessions, provider)
    text = buf.getvalue()
    assert text
    for what, value in creds.items():
        assert value not in text, f"the {what} appears in the logs"
        # Nor a piece of it: the random tail of any of them, and for our tokens anything past their
        # public kind and lookup prefix (which is all a log line may show).
        assert value[-16:] not in text, f"the end of the {what} appears in the logs"
        if value.startswith(("orz_", "orzr_")):
            assert value[:16] not in text, f"more than the prefix of the {what} appears in the logs"


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
async def test_a_token_value_pasted_into_the_path_is_not_in_any_log_line(server, sessions, json_lines):
    """`orz cloud api-token revoke <the token itself>` or `orz cloud attach <a token>` by mistake: the access
    line (in either log format, ORZ_LOG_JSON), the log context's session id and every error line keep the
    token's kind and lookup prefix only."""
    t = await make_tenant(sessions, "acme")
    other = await make_tenant(sessions, "other")
    user = {"Authorization": f"Bearer {t.token}"}
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    with captured_logs(logging.INFO, None if json_lines else plain) as buf:
        async with httpx.AsyncClient(base_url=server, timeout=10) as http:
            assert (await http.delete(f"/v1/tokens/{other.token}", headers=user)).status_code == 404
            assert (await http.get(f"/v1/instances/{other.token}", headers=user)).status_code == 404
            assert (await http.post(f"/v1/instances/{other.token}/stop", headers=user)).status_code == 404
    text = "\n".join(line for line in buf.getvalue().splitlines() if not any(c in line for c in CLIENT_LOGGERS))
    assert "/v1/tokens/" in text and "/v1/instances/" in text  # the access lines were written
    assert other.token not in text and other.token[-16:] not in text, text
    assert other.token[:12] + "..." in text  # the kind and lookup prefix say which token it was


def test_formatter_redacts_credential_shaped_text():
    record = logging.makeLogRecord({"msg": "got %s and %s then Bearer abcdefgh12345678", "args": (
        "orz_ABCDEFGHijklmnopqrstuvwxyz0123456789", "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln"),
        "levelno": logging.INFO, "levelname": "INFO", "token": "orzr_ABCDEFGHijklmnopqrstu"})
    entry = json.loads(orz_log.JsonFormatter().format(record))
    assert entry["msg"] == "got orz_ABCDEFGH... and <jwt> then Bearer <redacted>"
    assert entry["token"] == "orzr_ABCDEFGH..."
    # A refresh token and a device code are credentials too, in a message and pasted into a path.
    later = logging.makeLogRecord({"msg": "refresh orzrt_ABCDEFGHijklmnopqrstu device orzd_ABCDEFGHijklmnopqrstu",
                                   "levelname": "INFO"})
    told = json.loads(orz_log.JsonFormatter().format(later))["msg"]
    assert told == "refresh orzrt_ABCDEFGH... device orzd_ABCDEFGH..."
    assert orz_log.without_credentials("/v1/tokens/orzrt_ABCDEFGHijklmnopqrstu") == "/v1/tokens/orzrt_ABCDEFGH..."
    # Ordinary words with underscores are left alone.
    plain = logging.makeLogRecord({"msg": "session_id orz_short and snake_case_words", "levelname": "INFO"})
    assert json.loads(orz_log.JsonFormatter().format(plain))["msg"] == "session_id orz_short and snake_case_words"


def test_new_context_drops_the_previous_requests_ids():
    orz_log.new_context(request_id="r1", session_id="s1")
    orz_log.bind(user_id="u1")
    orz_log.new_context(request_id="r2")
    assert orz_log.log_context.get() == {"request_id": "r2"}
