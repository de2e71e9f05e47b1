"""ApiClient against an API that restarts: 502/503/504 and dropped connections are tried again for idempotent
requests within the client's budget; a POST, a refused connect and other errors fail at once.

The server here is a raw asyncio HTTP responder scripted per request (it stands in for an API replica or the
load balancer in front of one while it restarts); the client and its transport are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from api.client import ApiClient, ApiError, ApiUnreachable
from tests.support import free_port

ME = {"id": "u1", "email": "a@example.com"}
Script = Callable[[int, str], bytes | None]  # (request number, method) -> raw answer, or None to hang up


def answer(status: int, body: dict[str, object], retry_after: str | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/problem+json" if status >= 400
            else "Content-Type: application/json", f"Content-Length: {len(data)}", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


UNAVAILABLE = answer(503, {"title": "Service Unavailable", "detail": "the API is starting", "status": 503},
                     retry_after="0")


class Scripted:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[str] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0].decode()
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if length:
                await reader.readexactly(length)
            self.seen.append(method)
            raw = self.script(len(self.seen), method)
            if raw is not None:
                writer.write(raw)
                await writer.drain()
        finally:
            writer.close()


Serve = Callable[[Script], Awaitable[Scripted]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts a scripted server on a free port; closes every one it started."""
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> Scripted:
        scripted = Scripted(script)
        server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
        servers.append(server)
        scripted.port = server.sockets[0].getsockname()[1]
        return scripted

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_a_restarting_api_is_waited_for_and_the_user_told_once(serve: Serve) -> None:
    s = await serve(lambda n, _m: UNAVAILABLE if n <= 2 else answer(200, ME))
    told: list[str] = []
    async with ApiClient(f"http://127.0.0.1:{s.port}", "t", retry_for_s=10, on_retry=told.append) as api:
        me = (await api.request("GET", "/v1/me")).json()
    assert me == ME
    assert s.seen == ["GET", "GET", "GET"]
    assert len(told) == 1 and "the API is starting" in told[0]


async def test_a_connection_dropped_under_a_get_is_tried_again(serve: Serve) -> None:
    s = await serve(lambda n, _m: None if n == 1 else answer(200, ME))
    async with ApiClient(f"http://127.0.0.1:{s.port}", "t", retry_for_s=10) as api:
        assert (await api.request("GET", "/v1/me")).json() == ME
    assert len(s.seen) == 2


async def test_without_a_budget_the_first_503_is_the_answer(serve: Serve) -> None:
    s = await serve(lambda _n, _m: UNAVAILABLE)
    async with ApiClient(f"http://127.0.0.1:{s.port}", "t") as api:
        with pytest.raises(ApiError) as err:
            await api.request("GET", "/v1/me")
    assert err.value.status == 503 and s.seen == ["GET"]


async def test_a_post_is_never_sent_twice(serve: Serve) -> None:
    for script in (lambda _n, _m: UNAVAILABLE, lambda _n, _m: None):
        s = await serve(script)
        async with ApiClient(f"http://127.0.0.1:{s.port}", "t", retry_for_s=10) as api:
            with pytest.raises(ApiError):
                await api.request("POST", "/v1/instances", json={"repo": "x"})
        assert s.seen == ["POST"]


async def test_other_errors_are_not_retried(serve: Serve) -> None:
    s = await serve(lambda _n, _m: answer(404, {"title": "Not Found", "detail": "no such session",
                                                          "status": 404}))
    async with ApiClient(f"http://127.0.0.1:{s.port}", "t", retry_for_s=10) as api:
        with pytest.raises(ApiError) as err:
            await api.request("GET", "/v1/instances/abc")
    assert err.value.status == 404 and s.seen == ["GET"]


async def test_the_budget_ends_the_waiting(serve: Serve) -> None:
    s = await serve(lambda _n, _m: UNAVAILABLE)
    async with ApiClient(f"http://127.0.0.1:{s.port}", "t", retry_for_s=1.0) as api:
        with pytest.raises(ApiError) as err:
            await api.request("GET", "/v1/me")
    assert err.value.status == 503
    assert 2 <= len(s.seen) <= 6  # backoff from 0.25 s: a handful of tries, not a flood


async def test_nothing_listening_fails_at_once() -> None:
    port = free_port()
    told: list[str] = []
    async with ApiClient(f"http://127.0.0.1:{port}", "t", retry_for_s=30, on_retry=told.append) as api:
        with pytest.raises(ApiUnreachable):
            await api.request("GET", "/v1/me")
    assert not told  # no "trying again": a refused connect is said at once, not waited on for 30 s


async def test_a_delete_waits_longer_than_other_requests() -> None:
    """A delete without force stops the session and waits for its runner's final report: seconds past the
    client's usual timeout. Cut there, the CLI would say the API is unreachable and send the DELETE again."""
    instance = {"id": "s1", "status": "deleting", "tier": "small", "attach_url": "http://x/v1/instances/s1/attach",
                "ssh": "ssh s1@x", "created_at": "2026-12-06T12:00:00Z", "updated_at": "2026-12-06T12:00:00Z"}

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.0)  # the server's stop and wait, shortened
        writer.write(answer(200, instance))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ApiClient(f"http://127.0.0.1:{port}", "t", timeout=0.3) as api:
            with pytest.raises(ApiUnreachable):
                await api.request("GET", "/v1/instances/s1")  # the usual timeout is what cuts this one
            assert (await api.delete_instance("s1")).status == "deleting"
    finally:
        server.close()
        await server.wait_closed()
