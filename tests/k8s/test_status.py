"""Pod objects map to session compute phases with reasons a user can act on."""

from __future__ import annotations

from typing import Any

import pytest

from api.instances.providers.kubernetes.cache import slim_pod
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
    (pod("Failed", reason="BackoffLimitExceeded"), False, "failed", "BackoffLimitExceeded"),
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


def oom_killed(at: str = "2026-12-06T15:20:00Z") -> dict[str, Any]:
    """A session Pod whose runner the OOM killer ended and Kubernetes restarted, as the kubelet reports it."""
    return {"metadata": {"name": "orz-a"},
            "spec": {"containers": [{"name": "runner", "resources": {"limits": {"memory": "4Gi"}}}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "runner", "restartCount": 1, "state": {"running": {"startedAt": at}},
                "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": at}}}]}}


def test_an_oom_killed_runner_is_news_for_the_user_once_per_kill() -> None:
    status = compute_status(oom_killed(), False)
    assert status.phase == "running"
    assert status.out_of_memory is not None
    assert "memory limit of 4Gi" in status.out_of_memory and "OOMKilled" in status.out_of_memory
    # The same kill reads the same (the reconciler records it once); the next kill reads differently.
    assert compute_status(oom_killed(), False).out_of_memory == status.out_of_memory
    assert compute_status(oom_killed("2026-12-06T15:25:00Z"), False).out_of_memory != status.out_of_memory
    crashed = oom_killed()
    crashed["status"]["containerStatuses"][0]["lastState"]["terminated"]["reason"] = "Error"
    assert compute_status(crashed, False).out_of_memory is None
    assert compute_status(pod("Running"), False).out_of_memory is None


def test_a_services_oom_kill_is_told_as_the_services_and_the_newest_kill_wins() -> None:
    """A sidecar's kill leaves the program and shells running: the user is not told they started again.
    With kills of two containers in the Pod's status, the newer one is the news."""
    obj = oom_killed("2026-12-06T15:20:00Z")
    obj["spec"]["containers"].append({"name": "postgres", "resources": {"limits": {"memory": "1Gi"}}})
    obj["status"]["containerStatuses"].append({
        "name": "postgres", "restartCount": 1, "state": {"running": {}},
        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": "2026-12-06T15:30:00Z"}}})
    told = compute_status(obj, False).out_of_memory
    assert told is not None
    assert "service 'postgres'" in told and "of 1Gi" in told and "15:30:00" in told
    assert "kept running" in told and "started again" not in told
    obj["status"]["containerStatuses"][0]["lastState"]["terminated"]["finishedAt"] = "2026-12-06T15:40:00Z"
    told = compute_status(obj, False).out_of_memory
    assert told is not None and "runner" in told and "of 4Gi" in told and "started again" in told


def test_the_watch_cache_keeps_what_tells_of_an_oom_kill() -> None:
    """The provider reads Pods from its slim watch cache: the kill and the limit survive the slimming."""
    assert compute_status(slim_pod(oom_killed()), False).out_of_memory == \
        compute_status(oom_killed(), False).out_of_memory
    crashed = oom_killed()
    crashed["status"]["containerStatuses"][0]["lastState"]["terminated"]["reason"] = "Error"
    assert "lastState" not in slim_pod(crashed)["status"]["containerStatuses"][0]


def evicted(message: str) -> dict[str, Any]:
    """A session Pod the kubelet evicted, as it leaves it: Failed, reason Evicted, its message."""
    return {"metadata": {"name": "orz-a"},
            "spec": {"containers": [{"name": "runner", "volumeMounts": [
                {"name": "workspace", "mountPath": "/workspace"}, {"name": "tmp", "mountPath": "/tmp"}]}]},
            "status": {"phase": "Failed", "reason": "Evicted", "message": message,
                       "conditions": [{"type": "DisruptionTarget", "status": "True",
                                       "reason": "TerminationByKubelet"}]}}


@pytest.mark.parametrize(("message", "told"), [
    ('Usage of EmptyDir volume "tmp" exceeds the limit "2Gi". ', "wrote more than 2Gi to /tmp"),
    ("Pod ephemeral local storage usage exceeds the total limit of containers 10Gi. ",
     "more of its node's disk than its limit"),
    ("The node was low on resource: ephemeral-storage. ", "node ran short of a resource"),
])
def test_an_evicted_session_says_what_filled_up_and_that_the_workspace_is_kept(message: str, told: str) -> None:
    """The kubelet's words alone ("Evicted") left the user guessing; the status names the directory, the
    limit, and that starting again keeps the workspace. It survives the provider's slim watch cache."""
    for obj in (evicted(message), slim_pod(evicted(message))):
        status = compute_status(obj, False)
        assert status.phase == "failed"
        assert status.message is not None
        assert told in status.message and message.strip() in status.message
        assert "workspace is kept" in status.message
    running = slim_pod({**evicted(message), "status": {"phase": "Running"}})
    assert "volumeMounts" not in running["spec"]["containers"][0]  # only evicted Pods keep their mounts
