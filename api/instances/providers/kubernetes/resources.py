"""Container resource requests and limits from a tier or a ``resources:`` override."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal

from api.schemas import TIER_RESOURCES

GPU_RESOURCE = "nvidia.com/gpu"
_CPU_RE = re.compile(r"^(?:\d+(?:\.\d{1,3})?|\d+m)$")
_MEMORY_RE = re.compile(r"^\d+(?:\.\d+)?(?:[KMGTPE]i?|[kKMGTPE]|e\d+)?$")
_GPU_RE = re.compile(r"^\d+$")
# Agents sit idle much of the time: request a share of the CPU limit so a node packs more sessions,
# but request all the memory so a busy node never OOM-kills a session it promised room to.
CPU_REQUEST_SHARE = Decimal("0.25")
MIN_CPU_REQUEST_M = 100
# Node disk a container may fill (its writable layer, its logs; the runner also its emptyDirs /tmp and
# /home, 2Gi each): past the limit the kubelet evicts the Pod. Without one, a session (a sidecar image that
# writes without end, a flood of output) filled the node's disk and every other session on it was evicted.
EPHEMERAL_STORAGE = "ephemeral-storage"
RUNNER_EPHEMERAL = {"requests": "1Gi", "limits": "6Gi"}
SIDECAR_EPHEMERAL = {"requests": "256Mi", "limits": "4Gi"}


class ResourceError(ValueError):
    """A ``resources:`` value Kubernetes would refuse; the message names the field."""


def cpu_millis(value: str) -> int:
    if not _CPU_RE.match(value):
        raise ResourceError(f"resources.cpu: {value!r} is not a CPU quantity like '2', '0.5' or '500m'")
    if value.endswith("m"):
        return int(value[:-1])
    return int(Decimal(value) * 1000)


def _check_memory(value: str) -> str:
    if not _MEMORY_RE.match(value):
        raise ResourceError(f"resources.memory: {value!r} is not a memory quantity like '4Gi' or '512Mi'")
    return value


def _check_gpu(value: str) -> str:
    if not _GPU_RE.match(value):
        raise ResourceError(f"resources.gpu: {value!r} is not a whole number of GPUs")
    return value


def effective(tier: str, override: Mapping[str, str] | None) -> dict[str, str]:
    """The tier's cpu and memory, with any override on top; keys: cpu, memory and maybe gpu."""
    if tier not in TIER_RESOURCES:
        raise ResourceError(f"tier: {tier!r} is not one of {', '.join(TIER_RESOURCES)}")
    merged = dict(TIER_RESOURCES[tier])
    for key, value in (override or {}).items():
        if key not in ("cpu", "memory", "gpu"):
            raise ResourceError(f"resources.{key}: unknown key (allowed: cpu, memory, gpu)")
        merged[key] = str(value).strip()
    return merged


def requirements(tier: str, override: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """A container ``resources`` block for the runner."""
    wanted = effective(tier, override)
    limit_m = cpu_millis(wanted["cpu"])
    if limit_m <= 0:
        raise ResourceError("resources.cpu: must be more than 0")
    request_m = min(limit_m, max(MIN_CPU_REQUEST_M, int(limit_m * CPU_REQUEST_SHARE)))
    memory = _check_memory(wanted["memory"])
    limits = {"cpu": wanted["cpu"], "memory": memory, EPHEMERAL_STORAGE: RUNNER_EPHEMERAL["limits"]}
    requests = {"cpu": f"{request_m}m", "memory": memory, EPHEMERAL_STORAGE: RUNNER_EPHEMERAL["requests"]}
    gpu = wanted.get("gpu")
    if gpu is not None and _check_gpu(gpu) != "0":
        # Extended resources cannot be overcommitted: requests must equal limits.
        limits[GPU_RESOURCE] = gpu
        requests[GPU_RESOURCE] = gpu
    return {"requests": requests, "limits": limits}


SIDECAR_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "50m", "memory": "64Mi", EPHEMERAL_STORAGE: SIDECAR_EPHEMERAL["requests"]},
    "limits": {"cpu": "1", "memory": "1Gi", EPHEMERAL_STORAGE: SIDECAR_EPHEMERAL["limits"]},
}
