"""The web door's pre-request limits: connections that have not finished a request count per address and in
all, as the SSH door's unauthenticated connections do (gateway/preauth.py)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import gateway_env

pytestmark = pytest.mark.integration


async def unfinished(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that starts a request and never finishes it (slow loris)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    return reader, writer


async def test_one_address_cannot_hold_the_doors_sockets_with_requests_it_never_finishes(tmp_path: Path) -> None:
    async with gateway_env(tmp_path, gateway_preauth_per_source=3, gateway_preauth_total=50) as env:
        port = env.gateway.web.port
        held = [await unfinished(port) for _ in range(3)]
        reader, writer = await unfinished(port)
        answer = await asyncio.wait_for(reader.read(), 5)  # answered and closed at once, not left to time out
        writer.close()
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        assert b"orz: too many unfinished requests from your address" in answer
        for _, w in held:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        # The count follows the connections: closed or answered, they no longer hold the address back.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5  # the door hears of the closes a moment after they happen
            while (await client.get("/healthz")).status_code != 200:
                assert loop.time() < deadline, "the closed connections still count"
                await asyncio.sleep(0.05)
            for _ in range(6):  # more than the limit, one after another: each answered request stops counting
                assert (await client.get("/healthz")).status_code == 200
