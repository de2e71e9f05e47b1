"""/metrics of the API: creations by result, wakes, sessions by state, HTTP durations by route and
status, and the multiprocess mode that merges several workers' values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sanic import Sanic

from api.app import create_metrics_app
from api.instances.providers.fake import FakeProvider
from tests.conftest import make_tenant
from tests.support import ROOT

SERVICE = {"Authorization": "Bearer svc-test-token-0123456789"}


async def scrape(app: Sanic) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics listener's /metrics as {(name, sorted labels): value}."""
    await app.asgi_client.get("/healthz")  # the API app has opened its database
    _, resp = await create_metrics_app(app).asgi_client.get("/metrics")
    # The test client stopped the API app after its request; close the connection the scrape opened.
    await app.ctx.state.engine.dispose()
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_creations_are_counted_by_result(app, sessions, provider: FakeProvider):
    t = await make_tenant(sessions, "acme")  # free plan: 2 active sessions
    before = await scrape(app)
    for _ in range(2):
        _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
        assert resp.status == 201
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    assert resp.status == 429
    _, resp = await app.asgi_client.post("/v1/instances", json={"tier": "gigantic"}, headers=t.headers)
    assert resp.status in (400, 422)
    other = await make_tenant(sessions, "beta")
    provider.fail_next = "no nodes left"
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=other.headers)
    assert resp.status == 503
    _, resp = await app.asgi_client.post("/v1/instances", json={})  # no token: not a create attempt
    assert resp.status == 401
    after = await scrape(app)

    def delta(result: str) -> float:
        name = "orz_session_creations_total"
        return value(after, name, result=result) - value(before, name, result=result)

    assert (delta("created"), delta("quota"), delta("invalid"), delta("provider_error"), delta("error")) == (
        2, 1, 1, 1, 0)


async def test_sessions_by_state_are_counted_from_the_database_on_scrape(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = resp.json["id"]
    await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    samples = await scrape(app)
    assert value(samples, "orz_sessions", state="stopped") == 1
    assert value(samples, "orz_sessions", state="starting") == 1
    assert value(samples, "orz_sessions", state="running") == 0
    assert ("orz_sessions", (("state", "deleted"),)) in samples  # every state is exported, zeros too


async def test_attach_to_a_stopped_session_counts_a_wake(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = resp.json["id"]
    await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    before = await scrape(app)
    _, resp = await app.asgi_client.post(
        "/internal/v1/authorize", json={"session_id": sid, "user_id": t.user_id, "method": "certificate"},
        headers=SERVICE)
    assert resp.status == 200 and resp.json["state"] == "starting"
    after = await scrape(app)
    assert value(after, "orz_session_wakes_total", result="started") == (
        value(before, "orz_session_wakes_total", result="started") + 1)


async def test_http_durations_are_labelled_by_route_template_and_status(app, sessions):
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/instances", json={}, headers=t.headers)
    sid = resp.json["id"]
    await app.asgi_client.get(f"/v1/instances/{sid}", headers=t.headers)
    await app.asgi_client.get("/v1/instances/nope-000000", headers=t.headers)
    await app.asgi_client.get("/no/such/endpoint")
    samples = await scrape(app)
    counts = {dict(labels)["route"] + " " + dict(labels)["status"]
              for (name, labels), v in samples.items()
              if name == "orz_http_request_duration_seconds_count" and v > 0}
    # The route template, never the session id, so the number of series stays bounded.
    routes = {c.split(" ")[0] for c in counts}
    assert not any(sid in r for r in routes)
    assert {"/v1/instances 201", "/v1/instances/{id} 200", "/v1/instances/{id} 404", "unmatched 404"} <= counts
    assert any(c.startswith("unmatched ") and c.endswith(" 404") for c in counts), counts
    _, resp = await app.asgi_client.get("/healthz")
    assert resp.headers["x-request-id"]


WORKER = """
import sys
from api import metrics
metrics.SESSION_CREATIONS.labels(result="created").inc(int(sys.argv[1]))
metrics.HTTP_DURATION.labels(route="/v1/instances", method="POST", status="201").observe(0.01)
metrics.SESSIONS_BY_STATE.labels(state="running").set(int(sys.argv[1]))
from gateway import metrics as gateway_metrics  # a service sharing the process (orz server)
gateway_metrics.ATTACHES.labels(door="ssh", result="ok").inc()
"""

SCRAPER = """
from api import metrics
from gateway import metrics as gateway_metrics
import sys
sys.stdout.write(metrics.exposition(gateway_metrics.REGISTRY).decode())
"""


def test_multiprocess_mode_merges_every_workers_values(tmp_path: Path):
    """Two worker processes count; a third process (any worker answering a scrape) sees the sums."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for n in ("2", "3"):
        subprocess.run([sys.executable, "-c", WORKER, n], env=env, check=True, timeout=60, cwd=ROOT)
    out = subprocess.run([sys.executable, "-c", SCRAPER], env=env, check=True, timeout=60, cwd=ROOT,
                         capture_output=True, text=True).stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out) for s in f.samples}
    assert value(samples, "orz_session_creations_total", result="created") == 5
    assert value(samples, "orz_http_request_duration_seconds_count",
                 route="/v1/instances", method="POST", status="201") == 2
    # "mostrecent": the last writer's value, not a per-process series or a sum.
    assert value(samples, "orz_sessions", state="running") == 3
    # Another registry of the process is in the files already: counted once, not repeated.
    assert out.count('orz_attaches_total{door="ssh",result="ok"}') == 1
    assert value(samples, "orz_attaches_total", door="ssh", result="ok") == 2


async def test_registries_of_services_sharing_the_process_are_exposed_too(app, sessions):
    from prometheus_client import CollectorRegistry, Counter

    other = CollectorRegistry()
    Counter("orz_other_service_events", "a service embedded in the same process", registry=other).inc(3)
    app.ctx.extra_metrics.append(other)
    samples = await scrape(app)
    assert value(samples, "orz_other_service_events_total") == 3
    assert ("orz_sessions", (("state", "running"),)) in samples


async def test_the_event_loops_tasks_are_counted_on_scrape(app) -> None:
    """orz_asyncio_tasks: what the soak's leak check reads at start and end of each service."""
    import asyncio

    from api import metrics
    from api.serve import ApiServer

    server = await ApiServer.start(app, "127.0.0.1", 0)
    try:
        before = metrics.REGISTRY.get_sample_value("orz_asyncio_tasks")
        extra = [asyncio.create_task(asyncio.sleep(30)) for _ in range(5)]
        after = metrics.REGISTRY.get_sample_value("orz_asyncio_tasks")
        for task in extra:
            task.cancel()
        await asyncio.gather(*extra, return_exceptions=True)
    finally:
        await server.stop()
    assert before is not None and before >= 1
    assert after == before + 5


async def test_a_wake_refused_for_the_users_input_is_invalid_not_our_error(app, sessions):
    """A stopped session whose secret its owner deleted cannot wake (422): the user's doing, not an outage."""
    t = await make_tenant(sessions, "acme")
    _, resp = await app.asgi_client.post("/v1/secrets", json={"name": "gh", "data": {"GITHUB_TOKEN": "x"}},
                                         headers=t.headers)
    assert resp.status == 201
    _, resp = await app.asgi_client.post("/v1/instances", json={"secrets": ["gh"]}, headers=t.headers)
    sid = resp.json["id"]
    await app.asgi_client.post(f"/v1/instances/{sid}/stop", headers=t.headers)
    _, resp = await app.asgi_client.delete("/v1/secrets/gh", headers=t.headers)
    assert resp.status == 204
    before = await scrape(app)
    _, resp = await app.asgi_client.post(
        "/internal/v1/authorize", json={"session_id": sid, "user_id": t.user_id, "method": "certificate"},
        headers=SERVICE)
    assert resp.status == 422 and "unknown secret: gh" in resp.json["detail"]
    after = await scrape(app)

    def delta(result: str) -> float:
        name = "orz_session_wakes_total"
        return value(after, name, result=result) - value(before, name, result=result)

    assert (delta("invalid"), delta("error")) == (1, 0)


async def test_made_up_methods_do_not_add_series(app, sessions):
    # HTTP lets a client name any method: each one a caller made up was a new series of the duration histogram
    # (14 samples each), so anyone could grow the API's memory and every scrape without bound.
    for n in range(20):
        await app.asgi_client.request(f"XMETHOD{n}", "/healthz")
    await app.asgi_client.request("GET", "/healthz")
    samples = await scrape(app)
    methods = {dict(labels)["method"] for (name, labels), v in samples.items()
               if name == "orz_http_request_duration_seconds_count" and v > 0}
    assert "GET" in methods and "other" in methods, methods
    assert not any(m.startswith("XMETHOD") for m in methods), methods
