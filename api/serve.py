"""Serve the Sanic app inside an existing event loop, so `orz server` can run it beside the gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import Counter
from typing import Any

from sanic import Sanic
from sanic.server.async_server import AsyncioServer
from sanic.server.protocols.http_protocol import HttpProtocol
from sanic.server.protocols.websocket_protocol import WebSocketProtocol

from api import metrics
from api.addresses import Network, limit_key, within
from api.errors import TooManyConnections
from api.settings import Settings

log = logging.getLogger(__name__)

# A refused connection is answered, then given this long to read it and hang up before it is cut.
REFUSED_LINGER_S = 5.0
# Refused connections one address may have lingering so at once; beyond them a refused connection is cut at
# once, unanswered: a client opening hundreds a second held as many of this process's descriptors for 5 s.
LINGERING_REFUSALS_PER_ADDRESS = 8
# One log line per address per this long says it was refused; orz_api_connections_refused_total counts all.
REFUSAL_LOG_INTERVAL_S = 60.0
# Addresses whose last logged refusal is remembered before the stale ones are forgotten.
_REFUSAL_LOG_KEYS = 4096
# An address that presented the service token (a gateway Pod: every user's attach and web-door requests
# come from it, through the in-cluster Service to this same port) is not capped for this long after.
SERVICE_CALLER_S = 600.0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 is any free port (Sanic itself reads 0 as "use 8000")."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                reuse_port=False, backlog=1024)


class ConnectionCap:
    """Open connections per client address (an IPv6 one by its /64: api/addresses.py) on one listener.

    One address holding thousands of idle keep-alive connections spends the file descriptors and memory
    every other client of this process shares. ``per_address`` 0: no cap. Peers in ``exempt`` (the
    trusted proxies: an ingress carries everyone's requests) are never capped, nor, for SERVICE_CALLER_S
    after, an address that presented the service token (``service_caller``), and its connections that
    did are no longer counted."""

    def __init__(self, per_address: int, exempt: tuple[Network, ...] = (), *,
                 lingering_per_address: int = LINGERING_REFUSALS_PER_ADDRESS,
                 log_every_s: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.per_address = per_address
        self.exempt = exempt
        self.lingering_per_address = lingering_per_address
        self.log_every_s = log_every_s
        self._open: Counter[str] = Counter()
        self._lingering: Counter[str] = Counter()
        self._logged: dict[str, float] = {}
        self._service_callers: dict[str, float] = {}  # exact address -> until (time.monotonic)

    def take(self, peer: str) -> str | None:
        """The key the connection counts under, or None when ``peer`` has its cap's worth open already."""
        key = limit_key(peer)
        if (self.per_address and self._open[key] >= self.per_address and not within(peer, self.exempt)
                and not self._is_service_caller(peer)):
            return None
        self._open[key] += 1
        return key

    def give_back(self, key: str) -> None:
        _release(self._open, key)

    def open(self, peer: str) -> int:
        return self._open[limit_key(peer)]

    def service_caller(self, peer: str) -> None:
        """``peer`` presented the service token: not capped for SERVICE_CALLER_S (exactly this address, not
        its /64: a node's Pods may share one)."""
        now = time.monotonic()
        self._service_callers = {a: until for a, until in self._service_callers.items() if until > now}
        self._service_callers[_exact(peer)] = now + SERVICE_CALLER_S

    def _is_service_caller(self, peer: str) -> bool:
        return self._service_callers.get(_exact(peer), 0.0) > time.monotonic()

    def linger(self, peer: str) -> str | None:
        """The key a refused connection from ``peer`` lingers under (answered, waiting for its client to hang
        up), or None when that address has ``lingering_per_address`` lingering already: cut it at once."""
        key = limit_key(peer)
        if self._lingering[key] >= self.lingering_per_address:
            return None
        self._lingering[key] += 1
        return key

    def lingered(self, key: str) -> None:
        _release(self._lingering, key)

    def lingering(self) -> int:
        """Refused connections still open, every address's."""
        return sum(self._lingering.values())

    def should_log(self, peer: str) -> bool:
        """Whether a refusal of ``peer`` gets a log line: the first in ``log_every_s`` of its address."""
        key, now = limit_key(peer), time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < self.log_every_s:
            return False
        if len(self._logged) >= _REFUSAL_LOG_KEYS:
            self._logged = {k: at for k, at in self._logged.items() if now - at < self.log_every_s}
        self._logged[key] = now
        return True

    def refusal(self) -> bytes:
        """A complete HTTP/1.1 429 problem+json answer that closes the connection."""
        problem = TooManyConnections(
            f"too many connections from your address ({self.per_address} open at once, the most one address "
            "may have); close some and try again").to_problem()
        body = json.dumps(problem).encode()
        return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/problem+json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
                b"\r\n\r\n" + body)


def _release(counts: Counter[str], key: str) -> None:
    """One fewer under ``key``; a key at zero goes, so the counts hold only addresses with something open."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


def _exact(peer: str) -> str:
    """``peer`` as one address (an IPv4-mapped IPv6 one as its IPv4 address)."""
    key = limit_key(peer)
    return peer if "/" in key else key


def capped_protocol(base: type[HttpProtocol], cap: ConnectionCap) -> type[HttpProtocol]:
    """``base`` (Sanic's protocol) counting each connection under ``cap``; one over it is answered 429 at once,
    before any request is read, and closed (cut unanswered when its address has more refusals lingering
    than ``cap.lingering_per_address``)."""

    class Capped(base):  # type: ignore[valid-type,misc]
        __slots__ = ("_cap_key", "_linger", "_linger_key", "_refused")  # Sanic's protocols have slots

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._cap_key: str | None = None
            self._refused = False
            self._linger: asyncio.TimerHandle | None = None
            self._linger_key: str | None = None

        def connection_made(self, transport: Any) -> None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            key = cap.take(address) if address else ""
            if key is None:
                self._refuse(transport, address)
                return
            self._cap_key = key or None
            super().connection_made(transport)

        def service_caller(self) -> None:
            """This connection carried a request with the service token: it no longer counts, and its address
            is not capped for a while (api/routes/deps.py require_service)."""
            peer = self.transport.get_extra_info("peername") if self.transport else None
            if isinstance(peer, tuple) and peer:
                cap.service_caller(str(peer[0]))
            if self._cap_key is not None:
                cap.give_back(self._cap_key)
                self._cap_key = None

        def _refuse(self, transport: Any, address: str) -> None:
            metrics.API_CONNECTIONS_REFUSED.inc()
            if cap.should_log(address):
                log.warning("connection from %s refused: %d open already (more from it in the next %g s are "
                            "only counted in orz_api_connections_refused_total; a proxy carrying many clients "
                            "belongs in ORZ_API_TRUSTED_PROXIES)", address, cap.per_address,
                            cap.log_every_s, extra={"event": "api_connection_refused"})
            self._refused = True
            self.transport = transport
            self._linger_key = cap.linger(address)
            if self._linger_key is None:
                transport.abort()  # its address has enough refusals waiting already
                return
            transport.write(cap.refusal())
            # Read what the client sends (and drop it) until it hangs up: closing with its request unread
            # would reset the connection, and the client might never see the answer.
            if transport.can_write_eof():
                transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def eof_received(self) -> bool | None:
            if self._refused:
                return False  # close
            return super().eof_received()  # type: ignore[no-any-return]

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                if self._linger is not None:
                    self._linger.cancel()
                if self._linger_key is not None:
                    cap.lingered(self._linger_key)
                    self._linger_key = None
                return
            if self._cap_key is not None:
                cap.give_back(self._cap_key)
                self._cap_key = None
            super().connection_lost(exc)

    Capped.__name__ = Capped.__qualname__ = f"Capped{base.__name__}"
    return Capped


def api_connection_cap(settings: Settings) -> ConnectionCap:
    """The API listener's cap, from ORZ_API_CONNECTIONS_PER_ADDRESS; the trusted proxies are exempt. On
    Kubernetes with none listed it warns: there users come through an Ingress, an HTTPRoute or a load
    balancer's SNAT, a few addresses that the cap would take for one client each."""
    proxies = settings.api_proxies()
    if settings.api_connections_per_address and not proxies and settings.provider == "kubernetes":
        log.warning("ORZ_API_TRUSTED_PROXIES is empty: if users reach this API through an ingress controller, a "
                    "Gateway or a load balancer that hides their addresses, list its addresses there, or it is "
                    "capped at ORZ_API_CONNECTIONS_PER_ADDRESS (%d) open connections like one client and users "
                    "get 429 too_many_connections under load", settings.api_connections_per_address,
                    extra={"event": "api_trusted_proxies_unset"})
    return ConnectionCap(settings.api_connections_per_address, proxies)


class ApiServer:
    """A started API listener; ``port`` is the real one when 0 was asked for."""

    def __init__(self, app: Sanic, server: AsyncioServer, cap: ConnectionCap | None = None) -> None:
        self.app = app
        self.cap = cap
        self._server = server
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        sock: socket.socket = self._server.server.sockets[0]  # type: ignore[union-attr]
        return int(sock.getsockname()[1])

    @classmethod
    async def start(cls, app: Sanic, host: str, port: int, *, sock: socket.socket | None = None,
                    cap: ConnectionCap | None = None) -> ApiServer:
        """Listen on host:port, or on ``sock``, a listening socket shared with other workers (`orz api --workers`).
        ``cap``: open connections per client address (ORZ_API_CONNECTIONS_PER_ADDRESS)."""
        if sock is None:
            sock = listen(host, port)
        sock.setblocking(False)
        protocol = None
        if cap is not None and cap.per_address:
            protocol = capped_protocol(WebSocketProtocol if app.websocket_enabled else HttpProtocol, cap)
        server = await app.create_server(sock=sock, return_asyncio_server=True, access_log=False, protocol=protocol)
        assert server is not None
        await server.startup()
        await server.before_start()
        await server.after_start()
        metrics.count_tasks(asyncio.get_running_loop())
        return cls(app, server, cap)

    async def stop(self) -> None:
        await self._server.before_stop()
        self._server.close()
        await self._server.wait_closed()
        await self._server.after_stop()
