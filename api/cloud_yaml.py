"""The rules of ``.orz/cloud.yaml`` that the runner, ``orz cloud validate`` and the providers share.

One home for what a service may be called, which env keys are accepted, how many services a session may
have, how a service name becomes a name Kubernetes (and the local provider's directories) accept, and the
limits and defaults of one service (image, ports, health check). Three layers read ``services:`` and all
take these from here: the file's full schema, with line numbers (``runner/cloud_config.py``), the runner's
report to the API (``api/schemas.SidecarSpec``), and the Kubernetes provider's sidecars
(``api/instances/providers/kubernetes/sidecars.py``).

Names follow what the earlier Go version accepted where that can run safely: service names may have
capitals, ``_`` and ``.`` (``My_DB``), and env keys may be dotted (``discovery.type``), as Elasticsearch's
image reads its settings from such variables.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Annotated, Any

from pydantic import Field, StringConstraints

# A service name as written in the file: a letter or digit, then letters, digits, '_', '.', '-'.
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# What a container name (and the local provider's directory for a service) must be: a DNS-1123 label,
# kept short enough that Kubernetes can derive names from it.
SERVICE_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,48}[a-z0-9])?$")
RESERVED_SERVICE_LABELS = frozenset({"runner"})
# The runner's own SSH port in a session's Pod, which a service's ports may not take.
RUNNER_SSH_PORT = 2222
# Env keys: Kubernetes' own rule for variable names (letters, digits, '_', '.', '-'; not a digit first).
# Shell-style names are a subset; dotted ones reach the program's environment as written.
ENV_KEY_RE = re.compile(r"^[-._A-Za-z][-._A-Za-z0-9]{0,127}$")
# The most services any plan may allow: the runner reports at most this many (schemas.Heartbeat).
SERVICES_CEILING = 16
DEFAULT_MAX_SERVICES = 5

# One service: its image reference, the ports it listens on, and its health check.
SERVICE_IMAGE_MAX = 512
SERVICE_PORTS_MAX = 16
HEALTH_SECONDS_MAX = 3600  # interval and timeout
HEALTH_RETRIES_MAX = 100
# What a health check without these keys gets. The runner writes them into its report, so the Kubernetes
# provider's probes and the local provider's checks run at the same pace.
HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 5.0
HEALTH_RETRIES = 3
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# The same limits as pydantic types, for the runner's parser and the runner -> API report.
EnvKey = Annotated[str, StringConstraints(pattern=ENV_KEY_RE.pattern)]
Image = Annotated[str, StringConstraints(min_length=1, max_length=SERVICE_IMAGE_MAX)]
Ports = Annotated[list[Annotated[int, Field(ge=1, le=65535)]], Field(max_length=SERVICE_PORTS_MAX)]
HealthSeconds = Annotated[float, Field(gt=0, le=HEALTH_SECONDS_MAX)]
Retries = Annotated[int, Field(ge=1, le=HEALTH_RETRIES_MAX)]


class ServiceNameError(ValueError):
    """A service name that cannot become a container name; the message says why."""


def service_label(name: str) -> str:
    """The DNS-1123 label for a service name: ``My_DB`` → ``my-db``; a valid label stays as it is."""
    if not SERVICE_NAME_RE.match(name):
        raise ServiceNameError("a service name starts with a letter or digit and has only letters, digits, "
                               "'_', '.' and '-' (at most 63)")
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    label = re.sub(r"-{2,}", "-", label)
    if not SERVICE_LABEL_RE.match(label):
        raise ServiceNameError(f"{name!r} becomes {label!r} as a container name, which is not a DNS label of "
                               "at most 50 characters")
    if label in RESERVED_SERVICE_LABELS:
        raise ServiceNameError(f"{label!r} is the session's own container; pick another name")
    return label


def service_labels(names: list[str]) -> dict[str, str]:
    """Each name's label; two names that map to one label (``my_db`` and ``my-db``) are an error."""
    labels: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        label = service_label(name)
        if label in seen:
            raise ServiceNameError(f"services {seen[label]!r} and {name!r} both become container name "
                                   f"{label!r}; rename one")
        seen[label] = name
        labels[name] = label
    return labels


def duration_seconds(value: Any) -> float:
    """Seconds from a number or a duration such as ``5s``, ``500ms``, ``1m`` (bounds are the caller's)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5s, 500ms or 1m")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError("expected a duration such as 5s, 500ms or 1m")


def check_service_count(count: int, limit: int) -> None:
    if count > limit:
        raise ValueError(f"at most {limit} services are allowed on this plan, found {count}")


def missing_secret(name: str, keys: Collection[str] | None = None) -> str:
    """Why ``${NAME}`` cannot be resolved, and how to give the session a secret that has it.

    ``keys``: the keys the session's secrets do have (names only, never values), when known."""
    if keys is None:
        having = ""
    elif not keys:
        having = " (it has none: no --secrets were named)"
    else:
        having = f" (its secrets have the keys {', '.join(sorted(keys))})"
    return (f"${{{name}}} is not one of this session's secrets{having}; create one with the key {name} "
            f"(orz cloud secrets create NAME --data {name}=...) and start the session with it: "
            f"orz cloud new --secrets NAME")
