"""A client that hangs up before the answer (found by the soak: a runner stopped mid-heartbeat) is not a
server error: no 500 in the metrics the API error ratio SLO reads, no "unhandled error" in the log."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from api import metrics
from api.serve import ApiServer


def count(route: str, status: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "orz_http_request_duration_seconds_count", {"route": route, "method": "GET", "status": status})
    return value or 0.0


async def test_a_client_hanging_up_mid_request_is_499_not_500(app: Sanic, caplog: pytest.LogCaptureFixture) -> None:
    started = asyncio.Event()

    async def slow(request: Request) -> HTTPResponse:
        started.set()
        await asyncio.sleep(10)  # the client leaves long before this
        return json({})

    app.add_route(slow, "/v1/test-slow", name="test_slow")
    route = "/v1/test-slow"
    before_500, before_499 = count(route, "500"), count(route, "499")
    server = await ApiServer.start(app, "127.0.0.1", 0)
    try:
        with caplog.at_level(logging.INFO, logger="api.app"):
            _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /v1/test-slow HTTP/1.1\r\nHost: test\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(started.wait(), 10)
            writer.close()  # the client is gone before the answer
            await writer.wait_closed()
            for _ in range(200):
                if count(route, "499") > before_499 or count(route, "500") > before_500:
                    break
                await asyncio.sleep(0.02)
    finally:
        await server.stop()
    assert count(route, "500") == before_500
    assert count(route, "499") == before_499 + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("client went away during GET /v1/test-slow" in r.getMessage() for r in caplog.records)
