"""Prometheus metrics of the API process (all names start with `orz_`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_DURATION = Histogram(
    "orz_http_request_duration_seconds", "API request duration by route and status",
    ["route", "method", "status"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SESSION_CREATIONS = Counter(
    "orz_session_creations_total", "Session create requests by result", ["result"], registry=REGISTRY
)
SESSION_TRANSITIONS = Counter(
    "orz_session_transitions_total", "Lifecycle transitions by target state", ["to_state"], registry=REGISTRY
)
SESSIONS_BY_STATE = Gauge(
    "orz_sessions", "Sessions by lifecycle state (refreshed on scrape)", ["state"], registry=REGISTRY
)
SCHEDULER_JOB_RUNS = Counter(
    "orz_scheduler_job_runs_total", "Scheduler job runs by job and result (ok, error, standby)",
    ["job", "result"], registry=REGISTRY,
)
SCHEDULER_LEADER = Gauge(
    "orz_scheduler_leader", "1 while this replica holds the scheduler lease", registry=REGISTRY
)
SESSION_REAPS = Counter(
    "orz_session_reaps_total", "Lifecycle actions of the idle reaper (idle_stop, unhealthy, heartbeat_fail, "
    "retention_delete)", ["action"], registry=REGISTRY,
)
RECONCILE_ACTIONS = Counter(
    "orz_reconcile_actions_total", "Repairs made by the reconciler by action", ["action"], registry=REGISTRY
)
