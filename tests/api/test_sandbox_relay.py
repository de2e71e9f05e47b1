"""The launcher's relay of host ports into a session: one session holds only so many connections to the host.

The relayed port is the API's, in the server process every session and user share: without a bound, one
session's processes opened a connection each (held with an unfinished request) until the server ran out of
file descriptors, and the API and gateway with it. Real sockets on the loopback, the launcher's own handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api.instances.providers import sandbox, sandbox_launch
from api.settings import Settings

MAX = 8


@contextlib.asynccontextmanager
async def holding_upstream() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A host service that greets each connection with "+" and keeps it open while its client does: the
    relay's upstream, counting what reaches it."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        writer.write(b"+")
        await reader.read()  # until the client goes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], held
    finally:
        server.close()
        for writer in held:
            writer.close()


async def first_byte(relay_port: int, clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                     source: str | None = None) -> bytes:
    """A new connection through the relay (from ``source``): b"+" when it reached the host service, b"" when
    it was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_port,
                                                   local_addr=(source, 0) if source else None)
    clients.append((reader, writer))
    return await asyncio.wait_for(reader.read(1), 10)


async def test_a_session_holds_at_most_its_share_of_connections_to_the_host() -> None:
    async with holding_upstream() as (port, held):
        relay = await asyncio.start_server(
            sandbox_launch.relay_to_host(port, slots=asyncio.Semaphore(MAX)), "127.0.0.1", 0)
        clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            relay_port = relay.sockets[0].getsockname()[1]
            assert [await first_byte(relay_port, clients) for _ in range(MAX)] == [b"+"] * MAX
            # Beyond the bound: closed at once, the host service never asked.
            assert [await first_byte(relay_port, clients) for _ in range(5)] == [b""] * 5
            assert len(held) == MAX

            clients[0][1].close()  # a connection that ends frees its place for the next one
            for _ in range(500):
                if await first_byte(relay_port, clients) == b"+":
                    break
                await asyncio.sleep(0.01)
            assert len(held) == MAX + 1
        finally:
            for _, writer in clients:
                writer.close()
            relay.close()


async def test_a_session_holding_every_connection_leaves_its_runner_its_own() -> None:
    """The session's programs hold every connection it may (a pool to a host database on an allowed port):
    the runner's heartbeats still reach the API, each on a new connection (its client drops idle ones after
    5 s, heartbeats come every 20), from its own address; the session's others, to the API too, do not."""
    async with holding_upstream() as (db_port, db_held), holding_upstream() as (api_port, api_held):
        slots, runner_slots = asyncio.Semaphore(MAX), asyncio.Semaphore(sandbox_launch.RUNNER_CONNECTIONS)
        db = await asyncio.start_server(sandbox_launch.relay_to_host(db_port, slots=slots), "127.0.0.1", 0)
        api = await asyncio.start_server(
            sandbox_launch.relay_to_host(api_port, slots=slots, runner_slots=runner_slots), "127.0.0.1", 0)
        db_relay, api_relay = db.sockets[0].getsockname()[1], api.sockets[0].getsockname()[1]
        clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        runner = sandbox_launch.RUNNER_SOURCE
        try:
            assert [await first_byte(db_relay, clients) for _ in range(MAX)] == [b"+"] * MAX
            assert await first_byte(api_relay, clients) == b""  # the session's own, to the API: its bound
            assert await first_byte(api_relay, clients, runner) == b"+"  # the runner's heartbeat
            # The runner's own are bounded too: past them, it has only what the session left (nothing).
            more = [await first_byte(api_relay, clients, runner) for _ in range(sandbox_launch.RUNNER_CONNECTIONS)]
            assert more == [b"+"] * (sandbox_launch.RUNNER_CONNECTIONS - 1) + [b""]
            assert await first_byte(db_relay, clients, runner) == b""  # only the API port keeps any for it
            assert (len(db_held), len(api_held)) == (MAX, sandbox_launch.RUNNER_CONNECTIONS)
        finally:
            for _, writer in clients:
                writer.close()
            db.close()
            api.close()


def test_the_launcher_is_told_the_bound(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, sandbox_relay_max_connections=12)
    plan = sandbox.launcher_plan(
        bwrap=[], command=[], tools=sandbox.Tools(bwrap="bwrap", slirp4netns="slirp4netns"), relay_ports=[8080],
        cgroup_name=None, limits={}, paths=sandbox.SessionPaths(tmp_path / "s"), session_id="s-1",
        relay_max_connections=settings.sandbox_relay_max_connections, api_port=8080)
    assert plan["relay_max_connections"] == 12 and plan["api_port"] == 8080
    assert Settings(data_dir=tmp_path).sandbox_relay_max_connections == 64
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, sandbox_relay_max_connections=0)
