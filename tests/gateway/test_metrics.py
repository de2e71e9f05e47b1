"""The gateway's metrics: labels stay bounded, series exist from the start, /metrics on its own port."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics
from tests.gateway.conftest import SESSION, Env


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


# -- through the real gateway, with the real OpenSSH client ---------------------------------------------

async def scrape_async(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # The listener runs in its own thread; scrape from another so the gateway's loop keeps serving.
    return await asyncio.to_thread(scrape_port, port)


async def wait_for_sample(port: int, name: str, labels: dict[str, str], wanted: float,
                          timeout: float = 15) -> dict:
    key = (name, tuple(sorted(labels.items())))
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape_async(port)
        if samples.get(key) == wanted:
            return samples
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name}{labels} is {samples.get(key)}, not {wanted}")
        await asyncio.sleep(0.1)


async def test_ssh_attach_moves_active_sessions_0_1_0_and_counts_the_attach(env: Env) -> None:
    assert env.gateway.metrics_server is not None, "the gateway serves /metrics on gateway_metrics_port"
    port = env.gateway.metrics_server.port
    assert port == env.settings.gateway_metrics_port
    ssh = {"door": "ssh"}
    ok = {"door": "ssh", "result": "ok"}
    before = await wait_for_sample(port, "orz_active_sessions", ssh, 0)
    # The gateway process's own resource series, and no `*_created` companions of the counters.
    assert before[("process_resident_memory_bytes", ())] > 0
    assert not [name for name, _ in before if name.endswith("_created")]
    attaches_before = before[("orz_attaches_total", tuple(sorted(ok.items())))]
    latency_before = before[("orz_attach_latency_seconds_count", (("door", "ssh"),))]
    bytes_before = before[("orz_bytes_proxied_total", (("direction", "out"),))]

    # An interactive attach (pty, the session's program) held open by keeping stdin open.
    proc = await asyncio.create_subprocess_exec(
        *env.base_args(), "-tt", *env.cert_args(), f"{SESSION}@127.0.0.1",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout
    try:
        assert b"hi" in await asyncio.wait_for(proc.stdout.readuntil(b"hi"), 15)
        during = await wait_for_sample(port, "orz_active_sessions", ssh, 1)
        assert during[("orz_attaches_total", tuple(sorted(ok.items())))] == attaches_before + 1
        assert during[("orz_attach_latency_seconds_count", (("door", "ssh"),))] == latency_before + 1
        proc.stdin.write(b"ping\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.stdout.readuntil(b"pong"), 15)
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    after = await wait_for_sample(port, "orz_active_sessions", ssh, 0)
    assert after[("orz_attaches_total", tuple(sorted(ok.items())))] == attaches_before + 1
    assert after[("orz_bytes_proxied_total", (("direction", "out"),))] > bytes_before


async def test_refusals_and_bad_credentials_are_counted_by_kind(env: Env) -> None:
    port = env.gateway.metrics_server.port  # type: ignore[union-attr]
    rejected = ("orz_attaches_total", (("door", "ssh"), ("result", "rejected")))
    expired = ("orz_auth_failures_total", (("method", "jwt"), ("reason", "expired")))
    before = await scrape_async(port)
    # Someone else's session: authenticated, then refused by the API (the user's side, not an error).
    env.api.sessions[SESSION].owner = "usr_mallory"
    result = await env.ssh(*env.cert_args(), "--", "true")
    assert result.returncode != 0
    # An expired attach token: refused by the gateway itself.
    token = env.token(ttl_s=60, now=time.time() - 3600)
    result = await env.ssh(*env.token_args(), "--", "true", env=env.password_env(token))
    assert result.returncode != 0
    after = await scrape_async(port)
    assert after[rejected] == before.get(rejected, 0) + 1
    assert after[expired] == before.get(expired, 0) + 1
    assert after[("orz_attaches_total", (("door", "ssh"), ("result", "error")))] == before[
        ("orz_attaches_total", (("door", "ssh"), ("result", "error")))]
