"""The web door behind a TLS proxy: X-Forwarded-For is believed from trusted proxies only."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api.serve import ConnectionCap
from api.settings import Settings
from gateway import web_http as http
from gateway.preauth import PreauthLimiter
from tests.gateway.conftest import SESSION, gateway_env

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))


def test_a_peer_that_is_not_a_trusted_proxy_cannot_claim_another_address() -> None:
    assert http.client_address("198.51.100.9", "203.0.113.7", PROXIES) == "198.51.100.9"
    assert http.client_address("198.51.100.9", "203.0.113.7", ()) == "198.51.100.9"


def test_behind_trusted_proxies_the_nearest_untrusted_address_counts() -> None:
    assert http.client_address("10.1.2.3", "203.0.113.7", PROXIES) == "203.0.113.7"
    # Entries left of the nearest untrusted one were written by the client and can be forged.
    assert http.client_address("10.1.2.3", "1.2.3.4, 203.0.113.7, 10.9.9.9", PROXIES) == "203.0.113.7"
    assert http.client_address("10.1.2.3", "2001:db8::1", PROXIES) == "2001:db8::1"
    assert http.client_address("10.1.2.3", "10.4.4.4", PROXIES) == "10.1.2.3"  # only proxies: the peer
    assert http.client_address("10.1.2.3", "203.0.113.7, not-an-ip", PROXIES) == "10.1.2.3"
    assert http.client_address("10.1.2.3", None, PROXIES) == "10.1.2.3"


def test_trusted_proxies_setting_rejects_what_is_not_an_address(tmp_path: Path) -> None:
    ok = Settings(data_dir=tmp_path, gateway_web_trusted_proxies=" 10.0.0.0/8, 127.0.0.1 ,")
    assert ok.web_trusted_proxies() == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))
    with pytest.raises(ValidationError, match="not an IP address or CIDR: 'ingress'"):
        Settings(data_dir=tmp_path, gateway_web_trusted_proxies="10.0.0.0/8,ingress")


async def _refused_status(port: int, forwarded_for: str) -> int:
    url = f"ws://127.0.0.1:{port}/v1/instances/{SESSION}/attach?token=not.a.jwt"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers={"X-Forwarded-For": forwarded_for}, open_timeout=5):
            pass
    return refused.value.response.status_code


async def test_failed_attempts_are_limited_per_browser_address_behind_a_trusted_proxy(tmp_path: Path) -> None:
    async with gateway_env(tmp_path, gateway_web_trusted_proxies="127.0.0.1") as env:
        assert env.gateway.web is not None
        port = env.gateway.web.port
        limit = env.settings.auth_fail_limit
        assert [await _refused_status(port, "203.0.113.7") for _ in range(limit)] == [401] * limit
        assert await _refused_status(port, "203.0.113.7") == 429
        # Another browser behind the same proxy is not locked out with it.
        assert await _refused_status(port, "203.0.113.8") == 401


async def test_without_trusted_proxies_the_header_is_ignored(tmp_path: Path) -> None:
    async with gateway_env(tmp_path) as env:
        assert env.gateway.web is not None
        port = env.gateway.web.port
        limit = env.settings.auth_fail_limit
        for n in range(limit):
            assert await _refused_status(port, f"203.0.113.{n}") == 401  # a forged header changes nothing
        assert await _refused_status(port, "203.0.113.99") == 429


async def test_addresses_of_one_ipv6_prefix_share_one_limit(tmp_path: Path) -> None:
    # Any IPv6 host has a /64 to pick source addresses from: counted per address, a guesser rotating
    # through it was never limited. One /64 counts as one address; an IPv4 address written as IPv4-mapped
    # IPv6 counts as itself.
    async with gateway_env(tmp_path, gateway_web_trusted_proxies="127.0.0.1") as env:
        assert env.gateway.web is not None
        port = env.gateway.web.port
        limit = env.settings.auth_fail_limit
        assert [await _refused_status(port, f"2001:db8:1:2::{n + 1:x}") for n in range(limit)] == [401] * limit
        assert await _refused_status(port, "2001:db8:1:2:ffff:ffff:ffff:fffe") == 429
        assert await _refused_status(port, "2001:db8:1:3::1") == 401  # the next /64: someone else
        assert [await _refused_status(port, "198.51.100.4") for _ in range(limit)] == [401] * limit
        assert await _refused_status(port, "::ffff:198.51.100.4") == 429


def test_unauthenticated_connections_of_one_ipv6_prefix_share_one_limit() -> None:
    limiter = PreauthLimiter(per_source=2, total=100)
    assert [limiter.admit(f"2001:db8:5:6::{n}") for n in (1, 2, 3)] == ["ok", "ok", "source"]
    assert limiter.admit("2001:db8:5:7::1") == "ok"
    limiter.release("2001:db8:5:6::2")  # either address of the prefix frees the prefix's slot
    assert limiter.admit("2001:db8:5:6::abcd") == "ok"
    assert [limiter.admit(a) for a in ("192.0.2.1", "::ffff:192.0.2.1", "192.0.2.1")] == ["ok", "ok", "source"]


async def test_a_token_that_is_not_text_is_a_401_not_a_500(tmp_path: Path) -> None:
    """Header bytes that are not UTF-8 reached the API client as surrogates, which it cannot send: anyone had a 500
    and an ERROR line with its traceback per request on the public web door."""
    async with gateway_env(tmp_path) as env:
        assert env.gateway.web is not None
        for route in (f"/s/{SESSION}/token", f"/s/{SESSION}/recording"):
            reader, writer = await asyncio.open_connection("127.0.0.1", env.gateway.web.port)
            writer.write(f"GET {route} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
                         + b"Authorization: Bearer orz_\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\r\n\r\n")
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert status_line.split()[1] == b"401", (route, status_line)


async def test_the_apis_cap_on_the_gateways_connections_is_not_blamed_on_the_browser(tmp_path: Path) -> None:
    """The API's per-address connection cap refusing the gateway answered 429 "too many connections from your
    address": the browser was shown it as if it were its own address's doing."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(ConnectionCap(1).refusal())  # what a capped API sends, then reads until the client hangs up
        writer.write_eof()
        await reader.read()
        writer.close()

    api = await asyncio.start_server(refuse, "127.0.0.1", 0)
    try:
        async with gateway_env(tmp_path) as env:
            assert env.gateway.web is not None
            port = api.sockets[0].getsockname()[1]
            env.gateway.web.settings = env.settings.model_copy(update={"internal_api_url": f"http://127.0.0.1:{port}"})
            async with httpx.AsyncClient() as client:
                resp = await client.get(f"http://127.0.0.1:{env.gateway.web.port}/s/{SESSION}/token",
                                        headers={"Authorization": "Bearer orz_some_token"}, timeout=10)
            assert resp.status_code == 503 and resp.json() == {"detail": http.API_BUSY}, resp.text
    finally:
        api.close()
        await api.wait_closed()
