"""The process kubelet evicts a Pod past a local storage limit as the kubelet's eviction manager does
(rehearsal/kubelet.py): an emptyDir past its sizeLimit, a Pod past its containers' ephemeral-storage limits,
a container past its own. Disk use is what the files take on disk, as du counts it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rehearsal.kubelet import KILLED_EXIT_CODE, Cluster, Container, PodWorker, ServiceAccountTokens
from rehearsal.store import Store

NS = "sessions"
MIB = 1 << 20


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes standing in for the containers' PID 1; whatever a test leaves running is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def running_pod(tmp_path: Path, sleepers: list[subprocess.Popen[bytes]], volumes: list[dict[str, Any]],
                containers: dict[str, str | None]) -> PodWorker:
    """A Pod worker with one running process per container (name -> its ephemeral-storage limit or None)."""
    store = Store(require_namespaces=True)
    store.create("namespaces", "", {"metadata": {"name": NS}})
    specs = [{"name": name, "image": "orz",
              **({"resources": {"limits": {"ephemeral-storage": limit}}} if limit else {})}
             for name, limit in containers.items()]
    pod = store.create("pods", NS, {"metadata": {"name": "orz-s1"},
                                    "spec": {"containers": specs, "volumes": volumes}})
    cluster = Cluster(store=store, network=None, workdir=tmp_path, api_host="127.0.0.1",  # type: ignore[arg-type]
                      api_port=0, ca_file=tmp_path / "ca", tokens=ServiceAccountTokens(), logs={})
    worker = PodWorker(cluster, pod)
    worker.phase, worker.initialized = "Running", True
    worker.hosts = worker.dir / "hosts"
    for volume in volumes:
        (worker.dir / "volumes" / volume["name"]).mkdir(parents=True)
    worker.dir.mkdir(parents=True, exist_ok=True)
    (worker.dir / "logs").mkdir(parents=True)
    for spec in specs:
        process = subprocess.Popen(["sleep", "60"], start_new_session=True)
        sleepers.append(process)
        log_path = worker.dir / "logs" / f"{spec['name']}.log"
        worker.containers[spec["name"]] = Container(spec, process, log_path, {}, 0, 0)
    return worker


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def step(worker: PodWorker) -> None:
    """One pass of the worker's loop: its step, then its status reported."""
    worker._step()
    worker._report()


def reported(worker: PodWorker) -> dict[str, Any]:
    pod = worker.c.store.find("pods", NS, "orz-s1")
    assert pod is not None
    return pod.get("status") or {}


def evicted_with(worker: PodWorker, message: str) -> None:
    """The Pod as the kubelet leaves an evicted one: every container killed, Failed/Evicted with the message,
    a DisruptionTarget condition and an Evicted Event."""
    processes = [c.process for c in worker.containers.values()]
    step(worker)
    status = reported(worker)
    assert (status.get("phase"), status.get("reason"), status.get("message")) == ("Failed", "Evicted", message)
    assert {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}.items() <= next(
        c for c in status["conditions"] if c["type"] == "DisruptionTarget").items()
    for process in processes:
        assert process.wait(5) is not None
    assert all(s["state"]["terminated"]["exitCode"] == KILLED_EXIT_CODE for s in status["containerStatuses"])
    events, _, _ = worker.c.store.list("events", NS)
    assert any(e["reason"] == "Evicted" and e["message"] == message and e["type"] == "Warning" for e in events)


def test_an_empty_dir_past_its_size_limit_evicts_the_pod(tmp_path: Path, sleepers: list) -> None:
    worker = running_pod(tmp_path, sleepers, [{"name": "tmp", "emptyDir": {"sizeLimit": "1Mi"}}], {"runner": "6Gi"})
    write(worker.dir / "volumes" / "tmp" / "half", MIB // 2)
    step(worker)
    assert reported(worker).get("phase") == "Running"  # within its limit
    write(worker.dir / "volumes" / "tmp" / "deeper" / "more", MIB)
    worker.storage_due = 0.0
    evicted_with(worker, 'Usage of EmptyDir volume "tmp" exceeds the limit "1Mi". ')


def test_holes_and_memory_volumes_take_no_disk(tmp_path: Path, sleepers: list) -> None:
    """A sparse file's holes take no blocks, and a Memory emptyDir is tmpfs (its memory limit holds it)."""
    worker = running_pod(tmp_path, sleepers, [{"name": "tmp", "emptyDir": {"sizeLimit": "1Mi"}},
                                              {"name": "state", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
                         {"runner": None})
    with (worker.dir / "volumes" / "tmp" / "sparse").open("wb") as f:
        f.truncate(64 * MIB)
    write(worker.dir / "volumes" / "state" / "big", 2 * MIB)
    step(worker)
    assert reported(worker).get("phase") == "Running"


def test_a_pod_past_its_containers_limits_together_is_evicted(tmp_path: Path, sleepers: list) -> None:
    """Two containers with 1Mi each: an emptyDir without a sizeLimit and their logs count against 2Mi."""
    worker = running_pod(tmp_path, sleepers, [{"name": "cache", "emptyDir": {}}], {"runner": "1Mi", "pg": "1Mi"})
    write(worker.dir / "volumes" / "cache" / "a", MIB + MIB // 2)
    step(worker)
    assert reported(worker).get("phase") == "Running"
    write(worker.dir / "logs" / "pg.log", MIB // 2 + 64 * 1024)
    worker.storage_due = 0.0
    evicted_with(worker, "Pod ephemeral local storage usage exceeds the total limit of containers 2Mi. ")


def test_a_container_past_its_own_limit_is_evicted(tmp_path: Path, sleepers: list) -> None:
    """A container's log over its own limit, with the Pod inside its total (the other container has room)."""
    worker = running_pod(tmp_path, sleepers, [], {"runner": "8Mi", "pg": "1Mi"})
    write(worker.dir / "logs" / "pg.log", 2 * MIB)
    evicted_with(worker, 'Container pg exceeded its local ephemeral storage limit "1Mi". ')
