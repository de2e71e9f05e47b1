"""`orz cloud` while the API restarts: a read waits it out with one line saying so; a create is never sent twice.

Between the real `orz` and a real API sits a proxy that answers the first requests with the 503 an API
replica (or its load balancer) gives while it starts, then forwards bytes to the API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from tests.cli.conftest import LiveApi, Orz
from tests.conftest import Tenant
from tests.relay import ThreadedRelay

STARTING = json.dumps({"title": "Service Unavailable", "status": 503, "detail": "the API is starting"}).encode()


class RestartingProxy(ThreadedRelay):
    """Answers the first ``refuse_first`` requests with a starting API's 503, then relays to the API."""

    def __init__(self, upstream: str, refuse_first: int) -> None:
        super().__init__(upstream)
        self.refuse_left = refuse_first
        self.refused: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        await self.relay(reader, writer, head)


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
