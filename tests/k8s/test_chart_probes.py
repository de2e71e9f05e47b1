"""The chart's probes as the rehearsal's kubelet runs them (Kubernetes' semantics, tests/rehearsal): an API
replica on a busy node stays in its Service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.k8s.helm import render
from tests.k8s.test_chart import component
from tests.rehearsal.test_kubelet_probes import Backend, probe_once, worker_for

# What the API's /readyz took in CI's soak on a loaded machine (load 4 on 2 cores): a database round trip.
BUSY_READYZ_S = 1.5


def test_an_api_replica_whose_readiness_check_is_slow_on_a_busy_node_stays_ready(tmp_path: Path) -> None:
    (api,) = component(render(), "Deployment", "api")["spec"]["template"]["spec"]["containers"]
    backend = Backend()  # the replica's /readyz
    try:
        _slow_but_ready(tmp_path, api, backend)
    finally:
        backend.server.shutdown()
        backend.server.server_close()


def _slow_but_ready(tmp_path: Path, api: dict[str, Any], backend: Backend) -> None:
    worker, running = worker_for(tmp_path, backend.port, readiness=api["readinessProbe"])
    assert probe_once(worker, running)
    backend.delay_s = BUSY_READYZ_S
    # Well past failureThreshold periods of slow answers: the replica never leaves the Service.
    assert all(probe_once(worker, running) for _ in range(api["readinessProbe"].get("failureThreshold", 3) + 1))
    # A replica that answers 503 still leaves it after failureThreshold periods.
    backend.status = 503
    backend.delay_s = 0
    assert not all(probe_once(worker, running) for _ in range(api["readinessProbe"].get("failureThreshold", 3)))


def test_a_gateway_replica_slow_to_answer_on_a_busy_node_stays_ready_and_alive(tmp_path: Path) -> None:
    """The gateway's /readyz and /healthz ask neither the API nor the database (its listener, its drain and
    its trust anchors), but they answer on the event loop that carries every user's terminal: on a busy node
    it answers late too. Late must not take both replicas out of the Service, nor restart one (a liveness
    restart cuts every terminal through it); a 503 still takes it out."""
    (gateway,) = component(render(), "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    backend = Backend()  # the replica's web door
    try:
        for kind in ("readinessProbe", "livenessProbe"):
            # The rehearsal's worker probes a port named http; the gateway's is named web.
            probe = {**gateway[kind], "httpGet": {**gateway[kind]["httpGet"], "port": "http"}}
            backend.status, backend.delay_s = 200, 0.0
            (tmp_path / kind).mkdir()
            _slow_but_ready(tmp_path / kind, {"readinessProbe": probe}, backend)
    finally:
        backend.server.shutdown()
        backend.server.server_close()
