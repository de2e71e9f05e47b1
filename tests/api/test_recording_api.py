"""The recording's upload protocol against the real API and database (SQLite and PostgreSQL).

The fake provider stands in for any provider the API reads no files from (Kubernetes): its runners are
told to record, and what they upload over the internal route is what the public route serves. The
uploads here are made by hand with the session's runner token, as a runner that sends too much, too
late or twice would make them; tests/api/test_recording_local.py runs the real runner."""

from __future__ import annotations

import asyncio
import json

from sanic import Sanic
from sqlalchemy import func, select

from api import admin, schemas
from api.db.models import Recording, RecordingChunk
from api.errors import Conflict
from api.instances.providers.fake import FakeProvider
from api.instances.service import InstanceService
from api.openapi import build_document
from api.settings import Settings
from tests.conftest import Tenant, both_databases, make_tenant

HEADER = json.dumps({"version": 2, "width": 80, "height": 24, "timestamp": 1, "env": {"TERM": "xterm"}}) + "\n"


def line(t: float, text: str) -> str:
    return json.dumps([t, "o", text]) + "\n"


async def new_session(app: Sanic, t: Tenant, provider: FakeProvider) -> tuple[str, dict[str, str]]:
    _, resp = await app.asgi_client.post("/v1/instances", json={"program": "bash"}, headers=t.headers)
    assert resp.status == 201, resp.text
    sid = resp.json["id"]
    return sid, {"Authorization": f"Bearer {provider.specs[sid].runner_token}"}


async def upload(app: Sanic, sid: str, runner: dict[str, str], part: str, offset: int | str, data: str | bytes):
    body = data.encode() if isinstance(data, str) else data
    _, resp = await app.asgi_client.post(f"/internal/v1/instances/{sid}/recording",
                                         params={"part": part, "offset": str(offset)}, content=body,
                                         headers={**runner, "Content-Type": "application/octet-stream"})
    return resp


async def served(app: Sanic, sid: str, t: Tenant, part: str = "current"):
    _, resp = await app.asgi_client.get(f"/v1/instances/{sid}/recording", params={"part": part}, headers=t.headers)
    return resp


@both_databases
async def test_uploads_append_and_are_served_and_a_resent_upload_is_not_stored_twice(
        app: Sanic, sessions, provider: FakeProvider, settings: Settings) -> None:
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    assert provider.specs[sid].recording_max_bytes == settings.recording_max_bytes  # recorded on any provider
    assert "no recording yet" in (await served(app, sid, t)).json["detail"]

    first = HEADER + line(0.1, "hello")
    resp = await upload(app, sid, runner, "p1", 0, first)
    assert resp.status == 200 and resp.json == {"part": "p1", "offset": len(first)}
    # The answer was lost and the runner sends the same bytes again: refused, with where the part ends.
    again = await upload(app, sid, runner, "p1", 0, first)
    assert again.status == 409 and again.headers["content-type"] == "application/problem+json"
    assert (again.json["part"], again.json["offset"]) == ("p1", len(first))
    second = line(0.5, "world")
    assert (await upload(app, sid, runner, "p1", len(first), second)).status == 200
    got = await served(app, sid, t)
    assert got.status == 200 and got.headers["content-type"] == schemas.RECORDING_CONTENT_TYPE
    assert got.body.decode() == first + second
    assert "no earlier part" in (await served(app, sid, t, "previous")).json["detail"]

    # Another session's runner token, a user's token, no token: not this session's runner.
    _other, other_runner = await new_session(app, t, provider)
    for headers in (other_runner, t.headers, {}):
        assert (await upload(app, sid, headers, "p1", len(first + second), line(1, "x"))).status == 401
    for part, offset, body, why in (("bad/part", 0, HEADER, "part must be"), ("p1", "-1", "x", "offset must"),
                                    ("p1", "1e3", "x", "offset must"), ("p2", 0, "not a header\n", "asciicast"),
                                    ("p1", len(first + second), b"", "needs a body")):
        bad = await upload(app, sid, runner, part, offset, body)
        assert bad.status == 400 and why in bad.json["detail"], (part, bad.json)
    assert (await served(app, sid, t)).body.decode() == first + second


@both_databases
async def test_the_server_keeps_its_cap_and_one_previous_part_whatever_the_runner_sends(
        app: Sanic, sessions, provider: FakeProvider, settings: Settings) -> None:
    cap = settings.recording_max_bytes
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    too_big = await upload(app, sid, runner, "p1", 0, HEADER + "x" * schemas.RECORDING_UPLOAD_MAX_BYTES)
    assert too_big.status == 413 and "at most" in too_big.json["detail"]

    # A runner that keeps sending: each upload fits the route, but the part stops at the cap.
    filler = line(1, "y" * (schemas.RECORDING_UPLOAD_MAX_BYTES // 2))
    offset = 0
    body = HEADER + filler
    refused = None
    while refused is None:
        resp = await upload(app, sid, runner, "p1", offset, body)
        if resp.status != 200:
            refused = resp
            break
        offset = resp.json["offset"]
        body = filler
    assert refused.status == 413 and f"at most {cap} bytes" in refused.json["detail"]
    assert cap - len(filler) < offset <= cap
    assert len((await served(app, sid, t)).body) == offset

    # New parts: the one before becomes the previous part, and the one before that is gone.
    for n in (2, 3):
        assert (await upload(app, sid, runner, f"p{n}", 0, HEADER + line(0, f"part {n}"))).status == 200
    assert (await served(app, sid, t)).body.decode().endswith(line(0, "part 3"))
    assert (await served(app, sid, t, "previous")).body.decode().endswith(line(0, "part 2"))
    # The rotated-out part takes no more bytes, even from its offset 0.
    late = await upload(app, sid, runner, "p2", 0, HEADER)
    assert late.status == 409 and late.json["part"] == "p3"
    async with sessions() as db:
        stored = await db.scalar(select(func.sum(func.length(RecordingChunk.data)))
                                 .where(RecordingChunk.instance_id == sid))
    assert stored == 2 * len(HEADER + line(0, "part 2"))


@both_databases
async def test_org_off_refuses_uploads_and_deleting_the_session_deletes_its_recording(
        app: Sanic, sessions, provider: FakeProvider) -> None:
    t = await make_tenant(sessions, "acme")
    sid, runner = await new_session(app, t, provider)
    assert (await upload(app, sid, runner, "p1", 0, HEADER)).status == 200

    await admin.set_recording(sessions, t.org, False)
    refused = await upload(app, sid, runner, "p1", len(HEADER), line(1, "secret"))
    assert refused.status == 403 and "recording is turned off" in refused.json["detail"]
    off = await served(app, sid, t)
    assert off.status == 404 and "turned off for your org" in off.json["detail"]
    _, restarted = await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    _, restarted = await app.asgi_client.post(f"/v1/instances/{sid}/start", headers=t.headers)
    assert restarted.status == 200 and provider.specs[sid].recording_max_bytes == 0

    await admin.set_recording(sessions, t.org, True)
    assert (await served(app, sid, t)).body.decode() == HEADER  # kept for the session's lifetime
    _, gone = await app.asgi_client.delete(f"/v1/instances/{sid}", headers=t.headers)
    assert gone.status == 200, gone.text
    async with sessions() as db:
        for table in (Recording, RecordingChunk):
            assert await db.scalar(select(func.count()).select_from(table).where(table.instance_id == sid)) == 0


async def test_the_openapi_document_describes_the_recording_as_asciicast(app: Sanic) -> None:
    _, resp = await app.asgi_client.get("/v1/openapi.json")
    ok = resp.json["paths"]["/v1/instances/{id}/recording"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["application/x-asciicast"]
    upload_op = build_document("test", internal=True)["paths"]["/internal/v1/instances/{id}/recording"]["post"]
    assert {"409", "413", "403"} <= set(upload_op["responses"])


@both_databases
async def test_uploads_racing_for_the_same_offset_store_one_of_them(
        app: Sanic, sessions, provider: FakeProvider, settings: Settings) -> None:
    t = await make_tenant(sessions, "acme")
    sid, _runner = await new_session(app, t, provider)
    service = InstanceService(settings, sessions, provider)  # another API replica, on the same database
    token = provider.specs[sid].runner_token
    await service.upload_recording(sid, token, "p1", 0, HEADER.encode())

    async def one(n: int) -> object:
        try:
            return await service.upload_recording(sid, token, "p1", len(HEADER), line(n, f"racer {n}").encode())
        except Conflict as exc:
            return exc
    results = await asyncio.gather(*(one(n) for n in range(6)))
    won = [r for r in results if isinstance(r, schemas.RecordingAck)]
    assert len(won) == 1 and all(isinstance(r, Conflict) for r in results if r not in won)
    body = (await served(app, sid, t)).body.decode()
    assert body.count("racer") == 1 and len(body) == won[0].offset
