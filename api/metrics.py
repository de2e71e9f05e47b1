"""Prometheus metrics of the API process (all names start with `orz_`).

Multiprocess-safe: when PROMETHEUS_MULTIPROC_DIR is set before this module is imported (several API
workers, each its own process), prometheus-client keeps every value in files under that directory and
``exposition()`` merges all workers' files, so any worker can answer a scrape with the totals. The
directory must be empty when the first worker starts (the supervisor wipes it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from api import metrics_http

log = logging.getLogger(__name__)

# No `*_created` series: one more series per counter and histogram child that no query here uses.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, process_start_time_seconds...
# (Linux /proc). Not in multiprocess mode: there they would describe whichever worker answered.
if not os.environ.get(MULTIPROC_ENV):
    ProcessCollector(registry=REGISTRY)


# The event loop's live tasks: a number that only grows over a soak is a task leak (hack/soak.py reads it).
ASYNCIO_TASKS = Gauge("orz_asyncio_tasks", "asyncio tasks alive in this service's event loop", registry=REGISTRY)


def count_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """From now on each scrape counts ``loop``'s tasks (scrapes may come from another thread)."""
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))

def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition(*extra: CollectorRegistry) -> bytes:
    """The text format for /metrics: this process's registry (or every worker's values merged), then
    ``extra`` registries of other services sharing the process (`orz server` runs the gateway too)."""
    if multiprocess_dir():
        # The files hold every metric of every process, whichever registry it was declared in:
        # ``extra`` is already part of them.
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)
    return generate_latest(_FirstOfEachName((REGISTRY, *extra)))


class _FirstOfEachName:
    """Registries as one for the exposition, each metric family once: every service's registry has the
    process_* collector, and one process has one set of process_* series."""

    def __init__(self, registries: tuple[CollectorRegistry, ...]) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for registry in self.registries:
            for family in registry.collect():
                if family.name not in seen:
                    seen.add(family.name)
                    yield family


def serve(host: str, port: int, what: str) -> metrics_http.MetricsServer:
    """Serve this process's metrics on host:port in a daemon thread, for processes with no HTTP server
    of their own (`orz scheduler`)."""
    registry = REGISTRY
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server = metrics_http.start(host, port, registry)
    log.info("%s metrics on http://%s:%d/metrics", what, host, server.port)
    return server


def process_exited(pid: int | None = None) -> None:
    """Drop a stopped worker's live gauges (multiprocess mode only)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(pid or os.getpid())


HTTP_DURATION = Histogram(
    "orz_http_request_duration_seconds", "API request duration by route and status",
    ["route", "method", "status"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SESSION_CREATIONS = Counter(
    "orz_session_creations_total", "Session create requests by result (created, quota, invalid, "
    "provider_error, error)", ["result"], registry=REGISTRY
)
SESSION_WAKES = Counter(
    "orz_session_wakes_total", "Stopped sessions started by an attach (wake on connect) by result "
    "(started, quota, invalid, provider_error, error)", ["result"], registry=REGISTRY
)
SESSION_TRANSITIONS = Counter(
    "orz_session_transitions_total", "Lifecycle transitions by target state", ["to_state"], registry=REGISTRY
)
SESSIONS_BY_STATE = Gauge(
    "orz_sessions", "Sessions by lifecycle state (refreshed on scrape)", ["state"], registry=REGISTRY,
    multiprocess_mode="mostrecent",  # the worker that answered the last scrape counted the database
)
SCHEDULER_JOB_RUNS = Counter(
    # `task`, not `job`: Prometheus keeps `job` for the scrape job and would rename ours exported_job.
    "orz_scheduler_job_runs_total", "Scheduler job runs by task and result (ok, error, standby, fenced)",
    ["task", "result"], registry=REGISTRY,
)
SCHEDULER_JOB_DURATION = Histogram(
    "orz_scheduler_job_duration_seconds", "Duration of the scheduler jobs' passes (as leader) by task",
    ["task"], registry=REGISTRY, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SCHEDULER_LEADER = Gauge(
    "orz_scheduler_leader", "1 while this replica holds the scheduler lease", registry=REGISTRY
)
SESSION_REAPS = Counter(
    "orz_session_reaps_total", "Lifecycle actions of the idle reaper (idle_stop, unhealthy, heartbeat_fail, "
    "retention_delete)", ["action"], registry=REGISTRY,
)
API_CONNECTIONS_REFUSED = Counter(
    "orz_api_connections_refused_total", "API connections refused at once: their address had "
    "ORZ_API_CONNECTIONS_PER_ADDRESS open already", registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "orz_webhook_attempts_total", "Webhook delivery attempts by outcome (delivered, retry, failed)", ["result"],
    registry=REGISTRY,
)
RECONCILE_ACTIONS = Counter(
    "orz_reconcile_actions_total", "Repairs made by the reconciler by action", ["action"], registry=REGISTRY
)
