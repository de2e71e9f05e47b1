"""The process kubelet's probes as Kubernetes runs them (rehearsal/kubelet.py): a Pod leaves Ready only after
failureThreshold consecutive failures, a probe that answers later than timeoutSeconds fails, and each failure,
readiness change and Event is kept with its time and message for the evidence a failed soak saves."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rehearsal import evidence
from rehearsal.kubelet import Cluster, Container, PodWorker, ServiceAccountTokens
from rehearsal.store import Store

NS = "team"


class Backend:
    """A /readyz on 127.0.0.1 whose status and delay the test sets."""

    def __init__(self) -> None:
        self.status, self.delay_s = 200, 0.0
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server calls it by this name
                time.sleep(backend.delay_s)
                body = json.dumps({"status": "ok" if backend.status == 200 else "unavailable"}).encode()
                self.send_response(backend.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.server.shutdown()
    b.server.server_close()


def worker_for(tmp_path: Path, port: int, readiness: dict[str, Any] | None = None, **probe: Any
               ) -> tuple[PodWorker, Container]:
    """A Pod worker whose one running container has an HTTP readiness probe on 127.0.0.1:port (`readiness`,
    else /readyz on the port named http with `probe`'s fields)."""
    store = Store(require_namespaces=True)
    store.create("namespaces", "", {"metadata": {"name": NS}})
    spec = {"name": "api", "image": "orz", "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": readiness or {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1,
                                            **probe}}
    pod = store.create("pods", NS, {"metadata": {"name": "api-0"}, "spec": {"containers": [spec]}})
    cluster = Cluster(store=store, network=None, workdir=tmp_path, api_host="127.0.0.1",  # type: ignore[arg-type]
                      api_port=0, ca_file=tmp_path / "ca", tokens=ServiceAccountTokens(), logs={})
    worker = PodWorker(cluster, pod)
    worker.ip = "127.0.0.1"
    worker.phase, worker.initialized = "Running", True
    running = Container(spec, None, tmp_path / "api.log", {}, 0, 0)  # type: ignore[arg-type]  # no process needed
    worker.containers["api"] = running
    return worker, running


def probe_once(worker: PodWorker, running: Container) -> bool:
    """One readiness period: the probe runs (made due now), the status is reported; the Pod's Ready."""
    running.probe_due["readinessProbe"] = 0.0
    worker._probe(running)
    worker._report()
    pod = worker.c.store.find("pods", NS, "api-0")
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])


def test_ready_is_lost_only_after_failure_threshold_consecutive_failures(tmp_path: Path, backend: Backend) -> None:
    worker, running = worker_for(tmp_path, backend.port, failureThreshold=3)
    assert probe_once(worker, running)
    backend.status = 503
    assert [probe_once(worker, running) for _ in range(3)] == [True, True, False]
    backend.status = 200
    assert probe_once(worker, running)  # one success is enough again (successThreshold 1)
    backend.status = 503
    # Failures that are not consecutive never add up to the threshold.
    outcomes = []
    for status in (503, 503, 200, 503, 503):
        backend.status = status
        outcomes.append(probe_once(worker, running))
    assert all(outcomes)


def test_an_answer_later_than_timeout_seconds_is_a_failure(tmp_path: Path, backend: Backend) -> None:
    worker, running = worker_for(tmp_path, backend.port, failureThreshold=1, timeoutSeconds=1)
    backend.delay_s = 0.5
    assert probe_once(worker, running)
    backend.delay_s = 1.6
    assert not probe_once(worker, running)
    unhealthy = [h for h in worker.history if h["reason"] == "Unhealthy"]
    assert "timed out after 1 s" in unhealthy[-1]["message"]
    assert 1.0 <= unhealthy[-1]["seconds"] < 1.5


def test_failures_and_readiness_changes_are_kept_and_saved(tmp_path: Path, backend: Backend) -> None:
    worker, running = worker_for(tmp_path, backend.port, failureThreshold=2)
    assert probe_once(worker, running)
    backend.status = 503
    probe_once(worker, running)
    probe_once(worker, running)
    reasons = [h["reason"] for h in worker.history]
    assert reasons.count("Unhealthy") == 2
    assert reasons.index("NotReady") < reasons.index("PodNotReady")
    # One Event per reason and container, counted as it repeats, with the probe's answer in it.
    events, _, _ = worker.c.store.list("events", NS)
    unhealthy = [e for e in events if e["reason"] == "Unhealthy"]
    assert len(unhealthy) == 1 and unhealthy[0]["count"] == 2
    assert "statuscode: 503" in unhealthy[0]["message"] and unhealthy[0]["type"] == "Warning"
    # The evidence a soak saves: the log tail, the history and a timeline in time order.
    (worker.dir / "logs").mkdir(parents=True)
    (worker.dir / "logs" / "api.log").write_bytes(b"x" * 5000 + b"the end\n")

    class FakeCluster:
        store = worker.c.store
        kubelet = type("K", (), {"workers": {worker.uid: worker}})()

    dest = evidence.save(FakeCluster(), tmp_path / "evidence", log_tail=100)  # type: ignore[arg-type]
    pod_dir = dest / NS / f"api-0-{worker.uid[:8]}"
    assert (pod_dir / "api.log").read_bytes().endswith(b"the end\n")
    assert len((pod_dir / "api.log").read_bytes()) == 100
    lines = (dest / "timeline.txt").read_text().splitlines()
    assert any("PodNotReady" in line for line in lines) and lines == sorted(lines)
    assert json.loads((dest / "events.json").read_text())
