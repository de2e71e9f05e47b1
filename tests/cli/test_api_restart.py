"""`orz cloud` while the API restarts: a read waits it out with one line saying so; a create is never sent twice.

Between the real `orz` and a real API sits a proxy that answers the first requests with the 503 an API
replica (or its load balancer) gives while it starts, then forwards bytes to the API.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.cli.conftest import LiveApi, Orz
from tests.conftest import Tenant

STARTING = json.dumps({"title": "Service Unavailable", "status": 503, "detail": "the API is starting"}).encode()


class RestartingProxy:
    def __init__(self, upstream: str, refuse_first: int) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.refuse_left = refuse_first
        self.refused: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if self.refuse_left > 0:
            self.refuse_left -= 1
            self.refused.append(head.split(b" ", 2)[0].decode())
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
                         b"Retry-After: 0\r\nConnection: close\r\nContent-Length: "
                         + str(len(STARTING)).encode() + b"\r\n\r\n" + STARTING)
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        up_writer.write(head)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def __enter__(self) -> RestartingProxy:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            self.server.close()
            pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def restarting(live_api: LiveApi) -> Iterator[RestartingProxy]:
    with RestartingProxy(live_api.url, refuse_first=2) as proxy:
        yield proxy


def test_list_waits_out_a_restart_and_says_so_once(orz: Orz, logged_in: Tenant,
                                                 restarting: RestartingProxy) -> None:
    done = orz("cloud", "list", ORZBOB_API_URL=f"http://127.0.0.1:{restarting.port}")
    assert done.returncode == 0, done.stderr
    assert "active sessions" in done.stdout
    assert restarting.refused == ["GET", "GET"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orz: the API is starting; trying again"), done.stderr


def test_new_is_not_sent_twice_while_the_api_restarts(orz: Orz, logged_in: Tenant, live_api: LiveApi,
                                                     restarting: RestartingProxy) -> None:
    done = orz("cloud", "new", "--no-attach", "--repo", "https://github.com/example/app.git",
               ORZBOB_API_URL=f"http://127.0.0.1:{restarting.port}")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["orz: the API is starting"], done.stderr
    assert restarting.refused == ["POST"]
    assert live_api.provider.specs == {}  # nothing was created behind the refusal
