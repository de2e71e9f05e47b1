"""Metrics endpoints of the services as `orz` runs them: `orz scheduler` alone (as in its own pod) on
ORZ_SCHEDULER_METRICS_PORT with JSON log lines, `orz api` on ORZ_API_METRICS_PORT only, and `orz server` with
everything on its metrics port."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from api.db import migrate
from tests.support import ROOT, free_port, orz_env, stop_process, wait_until


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    except httpx.HTTPError:
        return {}
    if resp.status_code == 503:
        return {}  # still starting
    assert resp.status_code == 200, resp.text
    text = resp.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def assert_process_metrics_and_no_created(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    """process_* of the serving process are there; no `*_created` series; no label Prometheus owns."""
    names = {name for name, _ in samples}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
            "process_open_fds"} <= names
    assert not [n for n in names if n.endswith("_created")]
    assert not [labels for _, labels in samples if {"job", "instance"} & {k for k, _ in labels}]


def test_scheduler_serves_its_metrics(tmp_path):
    db = f"sqlite+aiosqlite:///{tmp_path / 'orz.db'}"
    migrate.upgrade(db)
    port = free_port()
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake", ORZ_DATABASE_URL=db, ORZ_DATA_DIR=str(tmp_path / "data"),
                  ORZ_SCHEDULER_METRICS_PORT=str(port), ORZ_REAP_INTERVAL_S="1", ORZ_API_HOST="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "scheduler"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reap_ok = ("orz_scheduler_job_runs_total", (("result", "ok"), ("task", "reap")))

        def reaped_or_exited() -> dict | None:
            if proc.poll() is not None:
                return {"exited": 1.0}
            samples = scrape(port)
            return samples if samples.get(reap_ok) else None

        samples = wait_until(reaped_or_exited, timeout=30, what="a reap pass on /metrics")
        assert proc.poll() is None
        assert samples[("orz_scheduler_leader", ())] == 1
        assert samples[("orz_scheduler_job_duration_seconds_count", (("task", "reap"),))] >= 1
        assert_process_metrics_and_no_created(samples)
    finally:
        _out, err = stop_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["level"] for line in lines), err


def test_api_serves_metrics_on_its_metrics_port_only(tmp_path):
    """/metrics shows how many sessions exist and the request mix: not on the public port, token or not."""
    db = f"sqlite+aiosqlite:///{tmp_path / 'orz.db'}"
    migrate.upgrade(db)
    api_port, metrics_port = free_port(), free_port()
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake", ORZ_DATABASE_URL=db, ORZ_DATA_DIR=str(tmp_path / "data"),
                  ORZ_API_HOST="127.0.0.1", ORZ_API_PORT=str(api_port), ORZ_API_METRICS_PORT=str(metrics_port))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        samples = wait_until(lambda: {"exited": 1.0} if proc.poll() is not None else scrape(metrics_port),
                             timeout=30, what="the API's metrics port")
        assert proc.poll() is None
        assert ("orz_sessions", (("state", "running"),)) in samples
        assert_process_metrics_and_no_created(samples)
        public = httpx.get(f"http://127.0.0.1:{api_port}/metrics", timeout=5)
        assert public.status_code == 404 and public.headers["content-type"] == "application/problem+json"
        assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5).status_code == 200
        # The metrics listener serves nothing else.
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/v1/instances", timeout=5).status_code == 404
    finally:
        _out, err = stop_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, err


def test_embedded_server_shows_api_scheduler_and_gateway_metrics_on_one_endpoint(tmp_path):
    api_port, ssh_port, metrics_port = free_port(), free_port(), free_port()
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake", ORZ_API_METRICS_PORT=str(metrics_port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "server", "--api-port", str(api_port), "--ssh-port", str(ssh_port),
         "--web-port", "0", "--data-dir", str(tmp_path / "data")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        def scraped() -> dict | None:
            if proc.poll() is not None:
                return {"exited": 1.0}
            samples = scrape(metrics_port)
            # The gateway's series, and the in-process scheduler holding its lease.
            ready = ("orz_active_sessions", (("door", "ssh"),)) in samples and samples.get(
                ("orz_scheduler_leader", ())) == 1
            return samples if ready else None

        samples = wait_until(scraped, timeout=60, what="orz server /metrics")
        assert proc.poll() is None
        assert ("orz_sessions", (("state", "running"),)) in samples  # the API's
        assert_process_metrics_and_no_created(samples)
        # The API's and the gateway's registries both collect process_*: one process, one set of series.
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert text.count("# TYPE process_resident_memory_bytes ") == 1
        # ... and only there: the API's public port does not serve them.
        assert httpx.get(f"http://127.0.0.1:{api_port}/metrics", timeout=5).status_code == 404
    finally:
        _out, err = stop_process(proc)
    assert proc.returncode == 0, err


def _per_worker_counts(shared: Path, route: str) -> dict[str, float]:
    """Requests on ``route`` by worker pid, read from each worker's own file in the shared directory."""
    counts = {}
    for histogram in shared.glob("histogram_*.db"):
        alone = shared / f"one-{histogram.stem}"
        alone.mkdir()
        shutil.copy(histogram, alone / histogram.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, str(alone))
        counts[histogram.stem.removeprefix("histogram_")] = sum(
            s.value for f in registry.collect() for s in f.samples
            if s.name == "orz_http_request_duration_seconds_count" and s.labels.get("route") == route)
        shutil.rmtree(alone)
    return counts


def test_api_workers_share_the_port_and_metrics_sum_them(tmp_path):
    """`orz api --workers 2`: both processes answer on one port, and /metrics (one listener) counts the
    requests of both."""
    db = f"sqlite+aiosqlite:///{tmp_path / 'orz.db'}"
    migrate.upgrade(db)
    api_port, metrics_port = free_port(), free_port()
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"left by an earlier run")  # wiped before the workers start
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="fake", ORZ_DATABASE_URL=db, ORZ_DATA_DIR=str(tmp_path / "data"),
                  ORZ_API_HOST="127.0.0.1", ORZ_API_PORT=str(api_port), ORZ_API_METRICS_PORT=str(metrics_port),
                  PROMETHEUS_MULTIPROC_DIR=str(shared))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--workers", "2"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    healthz = ("orz_http_request_duration_seconds_count", (("method", "GET"), ("route", "/healthz"),
                                                           ("status", "200")))
    try:
        wait_until(lambda: proc.poll() is not None or scrape(metrics_port), timeout=30, what="the metrics listener")
        assert proc.poll() is None

        def one() -> int:
            with httpx.Client(timeout=10) as http:  # a connection each: the kernel hands them to either worker
                return http.get(f"http://127.0.0.1:{api_port}/healthz").status_code

        sent = 0
        while len([c for c in _per_worker_counts(shared, "/healthz").values() if c]) < 2 and sent < 600:
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(lambda _: one(), range(40))) == {200}
            sent += 40
        per_worker = _per_worker_counts(shared, "/healthz")
        assert len(per_worker) == 2 and all(per_worker.values()), per_worker  # both workers answered some
        for _ in range(4):  # the first worker answers scrapes, with every worker's counts
            assert scrape(metrics_port)[healthz] == sent == sum(per_worker.values())
    finally:
        _out, err = stop_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert not (shared / "counter_999999.db").exists()


def test_api_workers_are_refused_with_the_local_provider(tmp_path):
    env = orz_env(tmp_path / "home", ORZ_PROVIDER="local", ORZ_DATA_DIR=str(tmp_path / "data"),
                  ORZ_API_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "cli", "api", "--workers", "2"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "needs ORZ_PROVIDER=kubernetes" in done.stderr, done.stderr
