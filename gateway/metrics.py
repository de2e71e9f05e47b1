"""Prometheus metrics of the gateway (names start with `orz_`), served on their own port.

The gateway's public ports face the internet; /metrics is on a separate listener
(settings.gateway_metrics_port, bound to the web door's host) that only the cluster reaches.

Attach results: ``ok`` (bridged to the runner), ``rejected`` (the user's side: not their session, no
such session, quota, stopped and not woken), ``error`` (ours: API unreachable, runner did not answer,
start failed, or the gateway could not load its trust anchors to check the credential at all; that
one is counted once per connection, before authentication). The attach SLO counts ok / (ok + error).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from api import metrics_http

log = logging.getLogger(__name__)

disable_created_metrics()  # no `*_created` series
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_* (CPU, memory, open fds, start time) of the gateway

Door = Literal["ssh", "web"]
DOORS: tuple[Door, ...] = ("ssh", "web")
ATTACH_RESULTS = ("ok", "rejected", "error")

ACTIVE_SESSIONS = Gauge(
    "orz_active_sessions", "Client connections bridged to a session right now, by door", ["door"],
    registry=REGISTRY, multiprocess_mode="livesum",  # summed over live processes if ever several
)
ATTACHES = Counter(
    "orz_attaches_total", "Attach attempts past authentication by door and result (ok, rejected, error)",
    ["door", "result"], registry=REGISTRY,
)
ATTACH_LATENCY = Histogram(
    "orz_attach_latency_seconds", "From authentication to an open bridge to the runner (wake-ups included)",
    ["door"], registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
AUTH_FAILURES = Counter(
    "orz_auth_failures_total", "Refused credentials by method (certificate, jwt, websocket) and reason",
    ["method", "reason"], registry=REGISTRY,
)
BYTES_PROXIED = Counter(
    "orz_bytes_proxied_total", "Bytes relayed between clients and runners (in: from the client)",
    ["direction"], registry=REGISTRY,
)
REVOKED = Counter(
    "orz_attachments_revoked_total", "Live attachments ended because access was withdrawn, by door",
    ["door"], registry=REGISTRY,
)
PREAUTH_REFUSED = Counter(
    "orz_preauth_refused_total", "SSH connections refused before authentication by limit (source, total)",
    ["limit"], registry=REGISTRY,
)
DRAINING = Gauge(
    "orz_gateway_connections_draining",
    "Client connections (SSH, and browser terminals) still open on a gateway that is shutting down",
    registry=REGISTRY, multiprocess_mode="livesum",
)

# The event loop's live tasks: a number that only grows over a soak is a task leak (hack/soak.py reads it).
ASYNCIO_TASKS = Gauge("orz_asyncio_tasks", "asyncio tasks alive in this service's event loop", registry=REGISTRY)


def count_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """From now on each scrape counts ``loop``'s tasks (scrapes may come from another thread)."""
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))

# Every series a dashboard or alert divides by exists from the start, at zero, so a fresh gateway
# shows 0 rather than "no data" and ratios are defined.
for _door in DOORS:
    ACTIVE_SESSIONS.labels(door=_door)
    ATTACH_LATENCY.labels(door=_door)
    for _result in ATTACH_RESULTS:
        ATTACHES.labels(door=_door, result=_result)
for _direction in ("in", "out"):
    BYTES_PROXIED.labels(direction=_direction)


# Refusal codes that are the platform's fault (the attach SLO counts them); every other refusal is
# the user's side: no such session, not theirs, quota, a stopped session they did not wake...
PLATFORM_CODES = frozenset({
    "unavailable", "start_timeout", "session_failed", "upstream_unavailable",
    "provider_unavailable", "not_ready", "internal_error", "credentials_unavailable",
})
# Bounded `reason` labels for refused credentials, found in the line the user is shown.
_CREDENTIAL_REASONS = (
    ("expired", "expired"), ("not yet valid", "not_yet_valid"), ("is not for session", "wrong_session"),
    ("not signed by", "untrusted_ca"), ("signature", "bad_signature"), ("does not name a user", "invalid"),
    ("lifetime is too long", "invalid"), ("misconfigured", "gateway_config"),
)


def is_platform_failure(code: str) -> bool:
    return code in PLATFORM_CODES


def credential_reason(line: str) -> str:
    """A reason label for a refused credential, from its (fixed) user-facing line."""
    for needle, reason in _CREDENTIAL_REASONS:
        if needle in line:
            return reason
    return "invalid"


def attached(door: Door, latency_s: float) -> None:
    ATTACHES.labels(door=door, result="ok").inc()
    ATTACH_LATENCY.labels(door=door).observe(max(0.0, latency_s))
    ACTIVE_SESSIONS.labels(door=door).inc()


def detached(door: Door, bytes_in: int, bytes_out: int) -> None:
    ACTIVE_SESSIONS.labels(door=door).dec()
    BYTES_PROXIED.labels(direction="in").inc(max(0, bytes_in))
    BYTES_PROXIED.labels(direction="out").inc(max(0, bytes_out))


def attach_failed(door: Door, code: str) -> None:
    ATTACHES.labels(door=door, result="error" if is_platform_failure(code) else "rejected").inc()


def auth_failed(method: str, reason: str) -> None:
    AUTH_FAILURES.labels(method=method, reason=reason).inc()


def revoked(door: Door) -> None:
    REVOKED.labels(door=door).inc()


def draining(connections: int) -> None:
    DRAINING.set(max(0, connections))


def preauth_refused(limit: Literal["source", "total"]) -> None:
    PREAUTH_REFUSED.labels(limit=limit).inc()


def serve(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> metrics_http.MetricsServer:
    """Start /metrics on host:port (0: any free port) in a daemon thread: a scrape never waits on the
    event loop that carries the users' bytes, and a busy loop never fails a scrape."""
    server = metrics_http.start(host, port, registry)
    log.info("gateway metrics on http://%s:%d/metrics", host, server.port)
    return server
