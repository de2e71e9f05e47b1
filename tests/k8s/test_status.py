"""Pod objects map to session compute phases with reasons a user can act on."""

from __future__ import annotations

from typing import Any

import pytest

from api.instances.providers.kubernetes.status import compute_status, pod_ip


def pod(phase: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "orz-a"}, "status": {"phase": phase, **status}}


def waiting(reason: str) -> list[dict[str, Any]]:
    return [{"name": "runner", "state": {"waiting": {"reason": reason}}}]


@pytest.mark.parametrize(("obj", "stopped", "phase", "message"), [
    (None, False, "absent", "no pod"),
    (None, True, "stopped", None),
    (pod("Pending"), False, "pending", "starting"),
    (pod("Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]),
     False, "pending", "waiting for cluster capacity"),
    (pod("Pending", containerStatuses=waiting("ImagePullBackOff")), False, "failed",
     "runner: the image could not be pulled (ImagePullBackOff)"),
    (pod("Pending", containerStatuses=waiting("ContainerCreating")), False, "pending", "starting"),
    (pod("Running"), False, "running", None),
    (pod("Running", containerStatuses=waiting("CrashLoopBackOff")), False, "failed",
     "runner: a container keeps crashing (CrashLoopBackOff)"),
    (pod("Failed", reason="Evicted"), False, "failed", "Evicted"),
    (pod("Succeeded"), False, "stopped", "the runner exited"),
    (pod("Unknown"), False, "pending", "the node is not reporting"),
    ({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Running"}}, False,
     "stopped", "stopping"),
])
def test_compute_status(obj: dict[str, Any] | None, stopped: bool, phase: str, message: str | None) -> None:
    status = compute_status(obj, stopped)
    assert (status.phase, status.message) == (phase, message)


def test_pod_ip() -> None:
    assert pod_ip(pod("Running", podIP="10.0.0.5")) == "10.0.0.5"
    assert pod_ip(pod("Pending")) is None
    assert pod_ip(None) is None
