"""Recordings end to end on the local provider: a real API over HTTP, runner processes, tmux, and the CLI.

The agent's pane is served as asciicast v2 to whoever may see the session (others: 404, a colleague:
403), `orz cloud replay` plays and saves it, and an org with recording off records nothing. The runner
uploads what it records to the API, which serves it from the database: what was uploaded outlives the
runner, a lost answer costs no duplicate bytes, and the API's cap and the org's setting hold whatever a
runner sends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from api import admin, schemas
from api.db.models import Instance, RecordingChunk
from runner.recording import UPLOAD_INTERVAL_S
from tests.api.test_lifecycle_local import Stack, gateway_key, short_tmp, stack  # noqa: F401
from tests.conftest import Tenant, make_tenant
from tests.support import orz

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
TEXT = "recorded-text-4242"
PROGRAM = f"bash -c 'echo {TEXT}; sleep 0.2; echo second-line; sleep infinity'"


async def owner_of(on: Stack) -> Tenant:
    """The stack's own user (org acme, the only org while sessions start: the sandbox-off stack needs that)."""
    token = await admin.create_token(on.service.db_sessions, on.who.email)
    return Tenant(org=on.who.org_name, email=on.who.email, token=token, user_id=on.who.user_id)


def api_url(on: Stack) -> str:
    return f"http://127.0.0.1:{on.settings.api_port}"


async def create(on: Stack, tenant: Tenant, program: str = PROGRAM) -> str:
    async with httpx.AsyncClient(base_url=api_url(on), headers=tenant.headers, timeout=10) as http:
        created = await http.post("/v1/instances", json={"program": program})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    await on.wait_state(sid, "running")
    return sid


async def fetch(on: Stack, sid: str, headers: dict[str, str], **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api_url(on), headers=headers, timeout=10) as http:
        return await http.get(f"/v1/instances/{sid}/recording", params=params)


async def wait_recording(on: Stack, sid: str, tenant: Tenant, text: str, timeout: float = 20) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await fetch(on, sid, tenant.headers)
        if got.status_code == 200 and text in got.text:
            return got
        assert loop.time() < deadline, f"{text!r} not in the recording: {got.status_code} {got.text[-500:]}"
        await asyncio.sleep(0.2)


def events(body: str) -> tuple[dict[str, Any], list[list[Any]]]:
    header, *rest = [json.loads(line) for line in body.splitlines()]
    return header, rest


@pytest.mark.parametrize("stack", ["off", "on"], indirect=True)
async def test_the_pane_is_served_as_asciicast_to_those_who_may_see_the_session(stack: Stack) -> None:  # noqa: F811
    owner = await owner_of(stack)
    sid = await create(stack, owner)
    got = await wait_recording(stack, sid, owner, "second-line")
    assert got.headers["content-type"] == schemas.RECORDING_CONTENT_TYPE
    assert "no-store" in got.headers["cache-control"]
    header, evs = events(got.text)
    assert header["version"] == 2 and header["width"] > 0 and header["height"] > 0
    output = [e for e in evs if e[1] == "o"]
    text = "".join(e[2] for e in output)
    assert text.index(TEXT) < text.index("second-line")
    assert [e[0] for e in evs] == sorted(e[0] for e in evs)

    # Another org: the session does not exist for them. A colleague: not theirs (403, as attach says).
    stranger = await make_tenant(stack.service.db_sessions, "elsewhere")
    refused = await fetch(stack, sid, stranger.headers)
    assert refused.status_code == 404 and refused.headers["content-type"] == "application/problem+json"
    assert TEXT not in refused.text
    await admin.create_user(stack.service.db_sessions, "colleague@acme.example", owner.org)
    colleague = await admin.create_token(stack.service.db_sessions, "colleague@acme.example")
    assert (await fetch(stack, sid, {"Authorization": f"Bearer {colleague}"})).status_code == 403
    assert (await fetch(stack, sid, {})).status_code == 401

    previous = await fetch(stack, sid, owner.headers, part="previous")
    assert previous.status_code == 404 and "no earlier part" in previous.json()["detail"]
    bad = await fetch(stack, sid, owner.headers, part="all")
    assert bad.status_code == 422 and "current, previous" in bad.json()["detail"]


async def test_replay_plays_and_saves_the_recording_and_stop_start_appends(stack: Stack, short_tmp: Path) -> None:  # noqa: F811
    owner = await owner_of(stack)
    sid = await create(stack, owner)
    await wait_recording(stack, sid, owner, "second-line")
    env = {"PATH": os.environ["PATH"], "HOME": str(short_tmp), "ORZBOB_API_URL": api_url(stack),
           "ORZBOB_TOKEN": owner.token}

    played = await asyncio.to_thread(orz, "cloud", "replay", sid, "--speed", "100", env=env)
    assert played.returncode == 0, played.stderr
    assert TEXT in played.stdout and "second-line" in played.stdout
    assert played.stdout.index(TEXT) < played.stdout.index("second-line")

    saved = short_tmp / "session.cast"
    done = await asyncio.to_thread(orz, "cloud", "replay", sid, "--output", str(saved), env=env)
    assert done.returncode == 0, done.stderr
    assert events(saved.read_text())[0]["version"] == 2 and TEXT in saved.read_text()
    assert saved.stat().st_mode & 0o777 == 0o600

    # Stopped and started again: the new run's output is appended, after a pause (capped on replay).
    async with httpx.AsyncClient(base_url=api_url(stack), headers=owner.headers, timeout=10) as http:
        assert (await http.post(f"/v1/instances/{sid}/stop")).status_code == 200
        await stack.wait_state(sid, "stopped")
        stopped = await fetch(stack, sid, owner.headers)
        assert stopped.status_code == 200 and TEXT in stopped.text  # kept while the session is stopped
        assert (await http.post(f"/v1/instances/{sid}/start")).status_code == 200
    await stack.wait_state(sid, "running")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (got := await fetch(stack, sid, owner.headers)).text.count("second-line") < 2:
        assert loop.time() < deadline, got.text[-500:]
        await asyncio.sleep(0.2)
    header, evs = events(got.text)
    assert header == events(saved.read_text())[0]  # the same part, appended to
    times = [e[0] for e in evs]
    assert times == sorted(times)

    missing = await asyncio.to_thread(orz, "cloud", "replay", "no-such-session", env=env)
    assert missing.returncode == 3 and "no such session" in missing.stderr


async def test_an_org_with_recording_off_records_nothing_and_says_so(stack: Stack) -> None:  # noqa: F811
    owner = await owner_of(stack)
    await admin.set_recording(stack.service.db_sessions, owner.org, False)
    sid = await create(stack, owner)
    got = await fetch(stack, sid, owner.headers)
    assert got.status_code == 404 and got.headers["content-type"] == "application/problem+json"
    assert "recording is turned off for your org" in got.json()["detail"]
    state_dir = stack.provider.session_dir(sid) / "state"
    assert not (state_dir / schemas.STATE_RECORDING).exists()
    assert not list(state_dir.glob("*.cast"))

    # Turned on again: the API serves again, and the runner records from the session's next start.
    await admin.set_recording(stack.service.db_sessions, owner.org, True)
    assert "no recording yet" in (await fetch(stack, sid, owner.headers)).json()["detail"]


async def stored_bytes(on: Stack, sid: str) -> int:
    async with on.service.db_sessions() as db:
        return int(await db.scalar(select(func.coalesce(func.sum(func.length(RecordingChunk.data)), 0))
                                   .where(RecordingChunk.instance_id == sid)) or 0)


def spool(on: Stack, sid: str) -> Path:
    """The runner's own file of the current part (what it uploads from)."""
    return on.provider.session_dir(sid) / "state" / schemas.STATE_RECORDING


async def test_what_was_uploaded_is_served_after_the_runner_is_killed_and_its_files_are_gone(
        stack: Stack) -> None:  # noqa: F811
    owner = await owner_of(stack)
    sid = await create(stack, owner)
    await wait_recording(stack, sid, owner, "second-line")
    async with stack.service.db_sessions() as db:
        pid = (await db.get(Instance, sid)).provider_state["pid"]
    os.killpg(int(pid), signal.SIGKILL)  # no last upload, no clean-up
    for path in spool(stack, sid).parent.glob("recording*"):
        path.unlink()
    got = await fetch(stack, sid, owner.headers)
    assert got.status_code == 200 and TEXT in got.text and "second-line" in got.text
    assert events(got.text)[0]["version"] == 2


class DropFirstAnswer:
    """An HTTP/1.1 relay in front of the API that passes everything on, except that it answers the first
    recording upload by closing the connection: the API stored the bytes, the runner never hears so."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.dropped = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> DropFirstAnswer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with httpx.AsyncClient(base_url=self.target, timeout=10) as http:
            try:
                while True:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                    method, path, _ = head[0].split(" ", 2)
                    headers = dict(line.split(":", 1) for line in head[1:] if line)
                    headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                    passed = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
                    resp = await http.request(method, path, content=body, headers=passed)
                    if method == "POST" and path.split("?")[0].endswith("/recording") and not self.dropped:
                        self.dropped += 1
                        return
                    writer.write(f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}\r\n"
                                 f"Content-Type: {resp.headers.get('content-type', 'text/plain')}\r\n"
                                 f"Content-Length: {len(resp.content)}\r\n\r\n".encode() + resp.content)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()


@pytest.mark.parametrize("stack", ["off"], indirect=True)  # the sandbox's network reaches only the API's port
async def test_an_upload_whose_answer_was_lost_is_not_stored_twice(stack: Stack) -> None:  # noqa: F811
    relay = await DropFirstAnswer(api_url(stack)).start()
    stack.service.settings = stack.service.settings.model_copy(update={"internal_api_url": relay.url})
    try:
        owner = await owner_of(stack)
        program = "bash -c 'for i in $(seq 1 12); do echo line-$i-of-12; sleep 0.4; done; sleep infinity'"
        sid = await create(stack, owner, program)
        got = await wait_recording(stack, sid, owner, "line-12-of-12")
        assert relay.dropped == 1
        text = "".join(e[2] for e in events(got.text)[1] if e[1] == "o")
        assert [text.count(f"line-{i}-of-12") for i in range(1, 13)] == [1] * 12
        # Byte for byte what the runner recorded: nothing twice, nothing missing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (got := await fetch(stack, sid, owner.headers)).content != spool(stack, sid).read_bytes():
            assert loop.time() < deadline, "the served recording is not the runner's"
            await asyncio.sleep(0.3)
    finally:
        await relay.close()


async def test_the_apis_cap_holds_against_a_runner_told_a_larger_one(stack: Stack) -> None:  # noqa: F811
    owner = await owner_of(stack)
    # The flood waits for the test's go (a file in the workspace), given once the API's cap is lowered.
    program = ("bash -c 'echo before-the-flood; until [ -e go ]; do sleep 0.1; done; "
               "head -c 300000 /dev/zero | tr \"\\0\" a; echo; echo after-the-flood; sleep infinity'")
    sid = await create(stack, owner, program)
    await wait_recording(stack, sid, owner, "before-the-flood")
    # The runner was told 8 MiB at its start; the API's cap is now the smallest allowed.
    cap = schemas.RECORDING_MIN_BYTES
    stack.service.settings = stack.service.settings.model_copy(update={"recording_max_bytes": cap})
    (stack.provider.session_dir(sid) / "workspace" / "go").touch()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while "after-the-flood" not in spool(stack, sid).read_text(encoding="utf-8", errors="replace"):
        assert loop.time() < deadline
        await asyncio.sleep(0.3)
    await asyncio.sleep(3 * UPLOAD_INTERVAL_S)  # a few upload rounds
    assert spool(stack, sid).stat().st_size > 300_000
    assert await stored_bytes(stack, sid) <= cap
    got = await fetch(stack, sid, owner.headers)
    assert got.status_code == 200 and len(got.content) <= cap and "before-the-flood" in got.text


async def test_turning_recording_off_refuses_a_running_sessions_uploads(stack: Stack) -> None:  # noqa: F811
    owner = await owner_of(stack)
    program = "bash -c 'while true; do echo tick-$RANDOM; sleep 0.2; done'"
    sid = await create(stack, owner, program)
    await wait_recording(stack, sid, owner, "tick-")
    await admin.set_recording(stack.service.db_sessions, owner.org, False)
    await asyncio.sleep(1.0)  # an upload already past the check may still land
    before = await stored_bytes(stack, sid)
    await asyncio.sleep(3 * UPLOAD_INTERVAL_S)  # the pane keeps printing, the runner keeps trying
    assert await stored_bytes(stack, sid) == before
    assert spool(stack, sid).stat().st_size > before  # recorded on its side, never taken
    got = await fetch(stack, sid, owner.headers)
    assert got.status_code == 404 and "turned off for your org" in got.json()["detail"]


LAST_WORDS = "printed-right-before-the-stop"
# Prints its last line when the test says so (a file in the workspace), then waits to be stopped.
LAST_WORDS_PROGRAM = (f"bash -c 'echo waiting-for-go; until [ -e go ]; do sleep 0.05; done; echo {LAST_WORDS}; "
                      "sleep infinity'")


def runner_token(on: Stack, pid: int) -> str:
    """The runner's token, as its process was given it (the sandbox-off runner is the provider's pid)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    token = next(e for e in environ if e.startswith(b"ORZ_RUNNER_TOKEN=")).split(b"=", 1)[1].decode()
    assert token.startswith("orzr_"), "not a runner token"
    return token


async def last_words_pending(on: Stack, owner: Tenant) -> tuple[str, str]:
    """A session whose pane printed LAST_WORDS a moment ago, before the runner's next periodic upload;
    its id and its runner's token."""
    sid = await create(on, owner, LAST_WORDS_PROGRAM)
    await wait_recording(on, sid, owner, "waiting-for-go")
    token = runner_token(on, int((await on.row(sid)).provider_state["pid"]))
    (on.provider.session_dir(sid) / "workspace" / "go").touch()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while LAST_WORDS not in spool(on, sid).read_text(encoding="utf-8", errors="replace"):
        assert loop.time() < deadline, "the runner did not record the last line"
        await asyncio.sleep(0.02)
    return sid, token


async def runner_calls(on: Stack, sid: str, token: str) -> dict[str, int]:
    """What each route answers the runner token: its own routes and a user's."""
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api_url(on), headers=bearer, timeout=10) as http:
        return {
            "heartbeat": (await http.post(f"/internal/v1/instances/{sid}/heartbeat",
                                          json={"attached_clients": 1})).status_code,
            "status": (await http.get(f"/v1/instances/{sid}")).status_code,
            "recording": (await http.get(f"/v1/instances/{sid}/recording")).status_code,
            "authorize": (await http.post("/internal/v1/authorize",
                                          json={"session_id": sid, "user_id": "u", "method": "jwt"})).status_code,
            "start": (await http.post(f"/v1/instances/{sid}/start")).status_code,
        }


async def upload(on: Stack, sid: str, token: str, part: str, offset: int, data: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api_url(on), timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        return await http.post(f"/internal/v1/instances/{sid}/recording", params={"part": part, "offset": offset},
                               content=data)


@pytest.mark.parametrize("stack", ["off"], indirect=True)  # the test reads the runner's token from its process
async def test_the_last_output_before_a_stop_is_kept_and_the_stopped_token_only_uploads(stack: Stack) -> None:  # noqa: F811
    owner = await owner_of(stack)
    sid, token = await last_words_pending(stack, owner)
    async with httpx.AsyncClient(base_url=api_url(stack), headers=owner.headers, timeout=10) as http:
        assert (await http.post(f"/v1/instances/{sid}/stop")).status_code == 200
    await stack.wait_state(sid, "stopped")
    assert LAST_WORDS in (await fetch(stack, sid, owner.headers)).text

    # Within the grace the stopped runner's token takes the recording's upload, and nothing else.
    calls = await runner_calls(stack, sid, token)
    assert calls == {"heartbeat": 401, "status": 401, "recording": 401, "authorize": 401, "start": 401}, calls
    probe = await upload(stack, sid, token, "no-such-part", 5, b"[1, \"o\", \"x\"]\n")
    assert probe.status_code == 409, probe.text  # let in, and told where the recording ends
    part, offset = probe.json()["part"], probe.json()["offset"]
    late = b'[99.0, "o", "uploaded-in-the-grace"]\n'
    assert (await upload(stack, sid, token, part, offset, late)).status_code == 200
    assert "uploaded-in-the-grace" in (await fetch(stack, sid, owner.headers)).text
    assert (await stack.row(sid)).state == "stopped"  # nothing it sent moved the session

    # After the grace (the API's clock moved past it), not even that.
    real_clock = stack.service.now
    grace = timedelta(seconds=stack.provider.runner_stop_grace_s + 1)
    stack.service.now = lambda: real_clock() + grace
    try:
        refused = await upload(stack, sid, token, part, offset + len(late), b'[100.0, "o", "too-late"]\n')
    finally:
        stack.service.now = real_clock
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    assert token not in refused.text
    assert "too-late" not in (await fetch(stack, sid, owner.headers)).text


@pytest.mark.parametrize("stack", ["off"], indirect=True)
async def test_a_failed_sessions_runner_still_uploads_its_last_output(stack: Stack) -> None:  # noqa: F811
    """A failure (lost heartbeats, as the reconciler decides) takes the token before the runner gets its
    SIGTERM: the final upload it sends then is taken all the same."""
    owner = await owner_of(stack)
    sid, token = await last_words_pending(stack, owner)
    failed = await stack.service.fail_instance(await stack.row(sid), "system", "heartbeats lost")
    assert failed.state == "failed" and failed.runner_token_hash is None
    assert LAST_WORDS in (await fetch(stack, sid, owner.headers)).text
    assert (await runner_calls(stack, sid, token))["heartbeat"] == 401
