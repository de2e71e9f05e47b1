"""The gateway's metrics: labels stay bounded, series exist from the start, /metrics on its own port."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics


def scrape_port(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_credential_reasons_are_a_small_fixed_set():
    lines = {
        "certificate expired": "expired",
        "attach token expired": "expired",
        "certificate not yet valid (check your clock)": "not_yet_valid",
        "certificate is not for session demo-1": "wrong_session",
        "attach token is not for session x": "wrong_session",
        "certificate not signed by Orzbob Cloud": "untrusted_ca",
        "certificate signature not valid": "bad_signature",
        "attach token is not valid": "invalid",
        "something nobody planned for": "invalid",
    }
    for line, reason in lines.items():
        assert metrics.credential_reason(line) == reason, line


def test_refusals_split_into_the_users_side_and_ours():
    for code in ("not_found", "forbidden", "quota_exceeded", "conflict", "not_running", "unauthorized", "refused"):
        assert not metrics.is_platform_failure(code), code
    for code in ("unavailable", "start_timeout", "upstream_unavailable", "provider_unavailable"):
        assert metrics.is_platform_failure(code), code


def test_served_on_its_own_port_with_zeroed_series():
    registry = CollectorRegistry()
    server = metrics.serve("127.0.0.1", 0, registry=registry)
    try:
        assert server.port > 0
        assert scrape_port(server.port) == {}  # an empty registry: nothing but an answer
    finally:
        server.close()
    server = metrics.serve("127.0.0.1", 0)
    try:
        samples = scrape_port(server.port)
    finally:
        server.close()
    for door in ("ssh", "web"):
        assert ("orz_active_sessions", (("door", door),)) in samples
        for result in ("ok", "rejected", "error"):
            assert ("orz_attaches_total", (("door", door), ("result", result))) in samples
    assert ("orz_bytes_proxied_total", (("direction", "in"),)) in samples


def test_attach_lifecycle_moves_the_gauge_and_counters():
    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = value("orz_attaches_total", door="web", result="ok")
    before_err = value("orz_attaches_total", door="web", result="error")
    before_in = value("orz_bytes_proxied_total", direction="in")
    active = value("orz_active_sessions", door="web")
    metrics.attached("web", 0.2)
    assert value("orz_active_sessions", door="web") == active + 1
    metrics.detached("web", bytes_in=10, bytes_out=2000)
    metrics.attach_failed("web", "start_timeout")
    assert value("orz_active_sessions", door="web") == active
    assert value("orz_attaches_total", door="web", result="ok") == before_ok + 1
    assert value("orz_attaches_total", door="web", result="error") == before_err + 1
    assert value("orz_bytes_proxied_total", direction="in") == before_in + 10
    assert value("orz_attach_latency_seconds_count", door="web") >= 1
