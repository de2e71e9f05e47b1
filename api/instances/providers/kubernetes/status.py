"""What a Pod's status means for a session: a pure mapping from the Pod object to a ComputeStatus."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from api.instances.providers.base import ComputeStatus
from api.instances.providers.kubernetes.names import RUNNER_CONTAINER

# Waiting reasons that will not fix themselves without a change from the user or an operator.
_FATAL_WAITING = {
    "ErrImagePull": "the image could not be pulled",
    "ImagePullBackOff": "the image could not be pulled",
    "InvalidImageName": "the image name is not valid",
    "CreateContainerConfigError": "the container configuration is invalid",
    "CreateContainerError": "the container could not be created",
    "CrashLoopBackOff": "a container keeps crashing",
}


def _container_problem(pod: Mapping[str, Any]) -> str | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in _FATAL_WAITING:
            return f"{cs.get('name', 'container')}: {_FATAL_WAITING[reason]} ({reason})"
    return None


def _out_of_memory(pod: Mapping[str, Any]) -> str | None:
    """What to tell the user when a container's last run ended in the OOM killer (Kubernetes restarts it).

    The newest kill of any container: the runner's takes the session's tmux, shells and program with it, a
    service's (``services:`` in cloud.yaml) only that service."""
    limits = {c.get("name"): ((c.get("resources") or {}).get("limits") or {}).get("memory")
              for c in (pod.get("spec") or {}).get("containers") or []}
    kills = [(str(last.get("finishedAt") or ""), cs.get("name") or "container", last)
             for cs in pod.get("status", {}).get("containerStatuses") or []
             for last in [((cs.get("lastState") or {}).get("terminated")) or {}]
             if last.get("reason") == "OOMKilled"]
    if not kills:
        return None
    _, name, last = max(kills, key=lambda kill: kill[0])  # RFC 3339 in UTC: the strings sort by time
    limit = f" of {limits[name]}" if limits.get(name) else ""
    lost = ("what ran in it (the program, shells, tmux) started again" if name == RUNNER_CONTAINER
            else "the session's program and shells kept running")
    what = "session's runner" if name == RUNNER_CONTAINER else f"service {name!r}"
    return (f"the {what} used more than its memory limit{limit} and was killed (OOMKilled) "
            f"at {last.get('finishedAt') or 'an unknown time'}; it was restarted, and {lost}")


_EMPTY_DIR_OVER = re.compile(r'EmptyDir volume "(?P<volume>[^"]+)" exceeds the limit "(?P<limit>[^"]+)"')


def _evicted(pod: Mapping[str, Any]) -> str | None:
    """What to tell the user when the kubelet evicted the session's Pod: what filled up, in the session's
    terms (a directory rather than a volume's name), and that the workspace (its own volume) is kept (the
    reconciler starts it again once; `orz cloud start` does after that)."""
    status = pod.get("status") or {}
    if status.get("reason") != "Evicted":
        return None
    message = str(status.get("message") or "").strip()
    over = _EMPTY_DIR_OVER.search(message)
    if over:
        paths = [mount.get("mountPath") for container in (pod.get("spec") or {}).get("containers") or []
                 if container.get("name") == RUNNER_CONTAINER
                 for mount in container.get("volumeMounts") or [] if mount.get("name") == over["volume"]]
        where = paths[0] if paths else f"its {over['volume']!r} volume"
        what = f"the session wrote more than {over['limit']} to {where}"
    elif "ephemeral local storage" in message:
        what = "the session used more of its node's disk than its limit"
    else:
        what = "the session's node ran short of a resource"
    return f"{what}, and Kubernetes stopped it (Evicted: {message or 'no message'}); its workspace is kept"[:400]


def _unschedulable(pod: Mapping[str, Any]) -> str | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False",
                                                                           "Unschedulable"):
            return "waiting for cluster capacity"
    return None


def pod_ip(pod: Mapping[str, Any] | None) -> str | None:
    return (pod or {}).get("status", {}).get("podIP") or None


def compute_status(pod: Mapping[str, Any] | None, stopped: bool) -> ComputeStatus:
    """``stopped`` says the provider stopped this session on purpose (its workspace is kept)."""
    if pod is None:
        return ComputeStatus("stopped") if stopped else ComputeStatus("absent", "no pod")
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return ComputeStatus("stopped", "stopping")
    phase = pod.get("status", {}).get("phase") or "Pending"
    oom = _out_of_memory(pod)
    if phase == "Running":
        problem = _container_problem(pod)
        return ComputeStatus("failed", problem, oom) if problem else ComputeStatus("running", None, oom)
    if phase == "Pending":
        problem = _container_problem(pod)
        if problem:
            return ComputeStatus("failed", problem, oom)
        return ComputeStatus("pending", _unschedulable(pod) or "starting", oom)
    if phase == "Succeeded":
        return ComputeStatus("stopped", "the runner exited")
    if phase == "Failed":
        reason = _evicted(pod) or str(pod.get("status", {}).get("reason") or "the pod failed")[:200]
        return ComputeStatus("failed", reason)
    return ComputeStatus("pending", "the node is not reporting")
