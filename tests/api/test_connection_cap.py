"""The API's own port caps open connections per client address (ORZ_API_CONNECTIONS_PER_ADDRESS): real
sockets to a real listener; one over the cap is answered 429 problem+json and closed, the others go on."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket

import httpx
import pytest
from sanic import Sanic

import api.serve as serving
from api import metrics
from api.addresses import Network, client_address, within
from api.serve import ApiServer, ConnectionCap, api_connection_cap
from api.settings import Settings

pytestmark = pytest.mark.timeout(60)

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"


async def kept_alive(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has had one answer and stays open (keep-alive), as a browser's or CLI's does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEALTH)
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.split()[1] == b"200", status
    while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        pass
    return reader, writer


async def refused_answer(port: int) -> bytes:
    """Everything the server sends a new connection that asks nothing, up to its close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def serve(app: Sanic, per_address: int, exempt: tuple[Network, ...] = ()) -> ApiServer:
    return await ApiServer.start(app, "127.0.0.1", 0, cap=ConnectionCap(per_address, exempt))


async def test_one_address_beyond_the_cap_is_answered_429_and_closed(app: Sanic) -> None:
    server = await serve(app, 3)
    assert server.cap is not None
    held = []
    refused_before = metrics.REGISTRY.get_sample_value("orz_api_connections_refused_total") or 0.0
    try:
        held = [await kept_alive(server.port) for _ in range(3)]
        answer = await refused_answer(server.port)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 "), answer
        assert b"content-type: application/problem+json" in head.lower()
        problem = json.loads(body)
        assert problem["code"] == "too_many_connections" and problem["status"] == 429
        assert "too many connections from your address" in problem["detail"]
        # An ordinary client sending its request at once reads the same answer, not a reset connection.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            resp = await http.get("/healthz")
        assert resp.status_code == 429 and resp.json()["code"] == "too_many_connections"
        assert (metrics.REGISTRY.get_sample_value("orz_api_connections_refused_total") or 0) == refused_before + 2
        # The connections already open keep being served.
        reader, writer = held[0]
        writer.write(HEALTH)
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"200"
        # One closes: its place is free again.
        held[1][1].close()
        await until(lambda: server.cap.open("127.0.0.1") == 2, "the closed connection still counts")
        held[1] = await kept_alive(server.port)
    finally:
        for _, writer in held:
            writer.close()
        await server.stop()


async def test_the_trusted_proxies_are_not_capped(app: Sanic, settings: Settings) -> None:
    """An ingress carries everyone's requests from its own address."""
    cap = api_connection_cap(settings.model_copy(update={"api_connections_per_address": 2,
                                                         "api_trusted_proxies": "127.0.0.0/8"}))
    assert cap.per_address == 2
    server = await ApiServer.start(app, "127.0.0.1", 0, cap=cap)
    held = []
    try:
        held = [await kept_alive(server.port) for _ in range(4)]
    finally:
        for _, writer in held:
            writer.close()
        await server.stop()


def test_an_ipv6_client_counts_by_its_64() -> None:
    cap = ConnectionCap(2)
    assert cap.take("2001:db8:1:2::1") and cap.take("2001:db8:1:2:ffff::9")
    assert cap.take("2001:db8:1:2::77") is None  # the same /64: one client
    assert cap.take("2001:db8:1:3::1")  # the next /64: someone else
    assert cap.take("10.0.0.1") and cap.take("::ffff:10.0.0.1") and cap.take("10.0.0.1") is None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_flood_of_refused_connections_holds_few_descriptors_and_logs_once(
        app: Sanic, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """400 quick connections from one address over a cap of 2: each refused one stayed open up to 5 s (400 of the
    server's descriptors) and logged a WARNING. Now a few linger, the rest are cut at once; one log line."""
    caplog.set_level(logging.INFO, logger="api.serve")
    monkeypatch.setattr(serving, "REFUSED_LINGER_S", 3600.0)  # none is cut by its timer while the test looks
    cap = ConnectionCap(2, lingering_per_address=4, log_every_s=3600)
    server = await ApiServer.start(app, "127.0.0.1", 0, cap=cap)
    refused_before = metrics.REGISTRY.get_sample_value("orz_api_connections_refused_total") or 0.0
    clients: list[socket.socket] = []
    try:
        held = [await kept_alive(server.port) for _ in range(2)]
        before = _open_fds()
        loop = asyncio.get_running_loop()
        for _ in range(400):
            client = socket.socket()
            client.setblocking(False)
            clients.append(client)
            await loop.sock_connect(client, ("127.0.0.1", server.port))
        await until(lambda: (metrics.REGISTRY.get_sample_value("orz_api_connections_refused_total") or 0)
                    == refused_before + 400, "not every connection was refused yet")
        # None of the clients has hung up: the server's side of each is open until the server closes it.
        await until(lambda: _open_fds() - before <= 400 + cap.lingering_per_address,
                    f"the server holds {_open_fds() - before - 400} refused connections")
        assert cap.lingering() == cap.lingering_per_address
        refusals = [r for r in caplog.records if getattr(r, "event", "") == "api_connection_refused"]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        for _, writer in held:
            writer.close()
    finally:
        for client in clients:
            client.close()
        await server.stop()
    await until(lambda: cap.lingering() == 0, "a refusal still lingers after its client hung up")


async def _access_check(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], token: str) -> bytes:
    """The gateway's cheapest service-token request, on a kept-alive connection; its status code."""
    reader, writer = conn
    body = b'{"attachments": []}'
    writer.write(b"POST /internal/v1/access-check HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    await writer.drain()
    status = (await asyncio.wait_for(reader.readline(), 10)).split()[1]
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return bytes(status)


async def test_the_gateway_is_not_capped_once_it_showed_the_service_token(app: Sanic, settings: Settings) -> None:
    """A gateway Pod reaches the API through the in-cluster Service, every user's attach and web-door requests
    from its one address: capped like one client, its users were refused 429 under load."""
    server = await serve(app, 2)
    assert server.cap is not None
    held = []
    try:
        held = [await kept_alive(server.port) for _ in range(2)]
        assert await _access_check(held[1], "not-the-service-token") in (b"401", b"403")
        assert (await refused_answer(server.port)).startswith(b"HTTP/1.1 429 ")  # a wrong token proves nothing
        assert await _access_check(held[0], settings.service_token.get_secret_value()) == b"200"
        # That connection no longer counts, and its address is not capped for a while.
        assert server.cap.open("127.0.0.1") == 1
        held += [await kept_alive(server.port) for _ in range(3)]
        assert server.cap.open("127.0.0.1") == 4
    finally:
        for _, writer in held:
            writer.close()
        await server.stop()


def test_an_ipv4_proxy_is_exempt_when_the_api_listens_on_both_families() -> None:
    """Listening on `::`, an IPv4 peer's address is `::ffff:a.b.c.d`: a listed IPv4 ingress was capped anyway."""
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    assert within("::ffff:10.1.2.3", proxies) and within("10.1.2.3", proxies)
    assert not within("::ffff:192.0.2.1", proxies) and not within("::ffff:a01:203", ()) and not within("x", proxies)
    cap = ConnectionCap(1, proxies)
    assert cap.take("::ffff:10.1.2.3") and cap.take("::ffff:10.1.2.3")
    assert client_address("::ffff:10.1.2.3", "198.51.100.7", proxies) == "198.51.100.7"


def test_on_kubernetes_an_empty_trusted_proxies_list_is_warned_about(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="api.serve")
    on_k8s = settings.model_copy(update={"provider": "kubernetes"})
    api_connection_cap(on_k8s)
    assert [r.event for r in caplog.records] == ["api_trusted_proxies_unset"]  # type: ignore[attr-defined]
    caplog.clear()
    api_connection_cap(on_k8s.model_copy(update={"api_trusted_proxies": "10.0.0.0/8"}))
    api_connection_cap(on_k8s.model_copy(update={"api_connections_per_address": 0}))
    api_connection_cap(settings)  # local: users come straight to it
    assert caplog.records == []
