"""Sidecar containers for the ``services:`` of ``.orz/cloud.yaml``, passed in as plain data."""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from api import cloud_yaml
from api.instances.providers.kubernetes.resources import SIDECAR_RESOURCES
from api.schemas import SECRET_REF_RE

# A value that embeds a secret in other text reads it from a helper variable of this prefix.
SECRET_HELPER_PREFIX = "ORZ_SECRET_"  # noqa: S105  # nosec B105  # a name prefix, not a value


class ServiceError(ValueError):
    """A service definition that cannot become a container; the message names the path."""


def _seconds(value: object, path: str, default: float) -> int:
    """Whole seconds for a probe (at least 1) from seconds or a duration such as ``10s`` or ``500ms``."""
    try:
        seconds = cloud_yaml.duration_seconds(default if value is None else value)
    except ValueError as exc:
        raise ServiceError(f"{path}: {exc}") from None
    if seconds <= 0:
        raise ServiceError(f"{path}: must be more than 0 seconds")
    if seconds > cloud_yaml.HEALTH_SECONDS_MAX:
        raise ServiceError(f"{path}: at most {cloud_yaml.HEALTH_SECONDS_MAX} seconds")
    # The runner reports seconds (0.5 from "500ms"); probes count whole seconds.
    return max(1, math.ceil(seconds))


@dataclass(frozen=True)
class Health:
    """A service's health check as probe settings; ``parse_services`` fills in cloud_yaml's defaults."""

    command: tuple[str, ...]
    interval_s: int
    timeout_s: int
    retries: int


@dataclass(frozen=True)
class Service:
    name: str  # as written in .orz/cloud.yaml (`My_DB`)
    label: str  # its container name, a DNS-1123 label (`my-db`)
    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    health: Health | None = None


def _health(raw: Any, path: str) -> Health | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or "command" not in raw:
        raise ServiceError(f"{path}: needs a command")
    command = raw["command"]
    if isinstance(command, str):
        argv: tuple[str, ...] = ("sh", "-c", command)
    elif isinstance(command, Sequence) and command and all(isinstance(c, str) for c in command):
        argv = tuple(command)
    else:
        raise ServiceError(f"{path}.command: must be a string or a list of strings")
    retries = raw.get("retries", cloud_yaml.HEALTH_RETRIES)
    if (not isinstance(retries, int) or isinstance(retries, bool)
            or not 1 <= retries <= cloud_yaml.HEALTH_RETRIES_MAX):
        raise ServiceError(f"{path}.retries: must be a whole number from 1 to {cloud_yaml.HEALTH_RETRIES_MAX}")
    return Health(
        command=argv,
        interval_s=_seconds(raw.get("interval"), f"{path}.interval", cloud_yaml.HEALTH_INTERVAL_S),
        timeout_s=_seconds(raw.get("timeout"), f"{path}.timeout", cloud_yaml.HEALTH_TIMEOUT_S),
        retries=retries,
    )


RawServices = Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]


# Registries whose images any user may run (settings.k8s_service_image_registries): public ones, where what a node
# can pull without credentials is what anyone can.
DEFAULT_REGISTRIES = ("docker.io", "ghcr.io", "quay.io", "public.ecr.aws", "registry.k8s.io", "mcr.microsoft.com")
_DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def image_registry(image: str) -> str:
    """The registry an image reference is pulled from, as the container runtime reads it: the first path part
    when it has a '.' or ':' or is 'localhost', else Docker Hub."""
    first, slash, _rest = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        return "docker.io"
    host = first.lower()
    return "docker.io" if host in _DOCKER_HUB_NAMES else host


def listed(raw: RawServices) -> list[Mapping[str, Any]]:
    """``{name: {image, ...}}`` (as in cloud.yaml) or a list of ``{name, image, ...}``, as the list."""
    return [{"name": k, **v} for k, v in raw.items()] if isinstance(raw, Mapping) else list(raw)


def parse_services(raw: RawServices, reserved_ports: Sequence[int] = (),
                   max_services: int = cloud_yaml.DEFAULT_MAX_SERVICES,
                   registries: Collection[str] = DEFAULT_REGISTRIES) -> list[Service]:
    """Accepts ``{name: {image, ...}}`` (as in cloud.yaml) or a list of ``{name, image, ...}``."""
    items = listed(raw)
    if len(items) > max_services:
        raise ServiceError(f"services: at most {max_services} are allowed on this plan, found {len(items)}")
    services: list[Service] = []
    seen_ports: set[int] = set(reserved_ports)
    labels: dict[str, str] = {}
    for item in items:
        name = str(item.get("name", ""))
        path = f"services.{name or '?'}"
        # Container names share the pod with "runner" and must be DNS labels: `My_DB` runs as my-db.
        try:
            label = cloud_yaml.service_label(name)
        except cloud_yaml.ServiceNameError as exc:
            raise ServiceError(f"{path}: {exc}") from None
        if label in labels:
            raise ServiceError(f"{path}: services {labels[label]!r} and {name!r} both become container name "
                               f"{label!r}; rename one")
        labels[label] = name
        image = item.get("image")
        if not isinstance(image, str) or not image or any(c.isspace() for c in image):
            raise ServiceError(f"{path}.image: required, a container image reference")
        if len(image) > cloud_yaml.SERVICE_IMAGE_MAX:
            raise ServiceError(f"{path}.image: at most {cloud_yaml.SERVICE_IMAGE_MAX} characters")
        registry = image_registry(image)
        if "*" not in registries and registry not in registries:
            # The node pulls it, with the node's registry credentials and from the node's network.
            raise ServiceError(f"{path}.image: {image} is from {registry}, which sessions may not pull from here "
                               f"(allowed: {', '.join(registries) or 'none'}; an admin sets "
                               "ORZ_K8S_SERVICE_IMAGE_REGISTRIES)")
        env = item.get("env") or {}
        if not isinstance(env, Mapping) or not all(cloud_yaml.ENV_KEY_RE.match(str(k)) for k in env):
            raise ServiceError(f"{path}.env: must map variable names (letters, digits, '_', '.', '-') to values")
        ports: list[int] = []
        raw_ports = item.get("ports") or []
        if isinstance(raw_ports, Sequence) and len(raw_ports) > cloud_yaml.SERVICE_PORTS_MAX:
            raise ServiceError(f"{path}.ports: at most {cloud_yaml.SERVICE_PORTS_MAX} ports")
        for port in raw_ports:
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise ServiceError(f"{path}.ports: {port!r} is not a port number")
            if port in seen_ports:
                raise ServiceError(f"{path}.ports: {port} is taken by another service or the runner")
            seen_ports.add(port)
            ports.append(port)
        services.append(Service(
            name=name, label=label, image=image, env={str(k): str(v) for k, v in env.items()}, ports=tuple(ports),
            health=_health(item.get("health"), f"{path}.health"),
        ))
    return services


@dataclass(frozen=True)
class SecretSource:
    """The session's Secret: ``${NAME}`` in a service's env reads its key NAME, never a copied value."""

    name: str
    keys: Collection[str]


def _literal(text: str) -> str:
    # The kubelet expands $(VAR) in env values and reads $$ as $: escaping every $ keeps text as written.
    return text.replace("$", "$$")


def env(service: Service, secret: SecretSource) -> list[dict[str, Any]]:
    """The container env of one service: plain values as written, secret references as secretKeyRef."""
    helpers: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for key, value in sorted(service.env.items()):
        parts = SECRET_REF_RE.split(value)  # literal, name, literal, name, ..., literal
        for ref in parts[1::2]:
            if ref not in secret.keys:
                raise ServiceError(f"services.{service.name}.env.{key}: {cloud_yaml.missing_secret(ref)}")
        if len(parts) == 3 and parts[0] == parts[2] == "":
            out.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": parts[1]}}})
            continue
        text = ""
        for i, part in enumerate(parts):
            if i % 2 == 0:
                text += _literal(part)
                continue
            # Text around a secret: the kubelet substitutes $(helper), defined from the Secret first.
            helper = SECRET_HELPER_PREFIX + part
            helpers[helper] = {"name": helper, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": part}}}
            text += f"$({helper})"
        out.append({"name": key, "value": text})
    clash = sorted(set(helpers) & set(service.env))
    if clash:
        raise ServiceError(f"services.{service.name}.env.{clash[0]}: names starting {SECRET_HELPER_PREFIX} "
                           "are reserved")
    return [*(helpers[name] for name in sorted(helpers)), *out]


def container(service: Service, security_context: Mapping[str, Any], secret: SecretSource,
              pull_policy: str = "Always") -> dict[str, Any]:
    """One sidecar container; the runner reaches it on localhost at its ports.

    ``pull_policy`` Always (ORZ_K8S_SERVICE_IMAGE_PULL_POLICY): a node's image cache is shared by every
    session on it, and with IfNotPresent a private image pulled there with someone's credentials ran for
    any session that named it."""
    body: dict[str, Any] = {
        "name": service.label,
        "image": service.image,
        "imagePullPolicy": pull_policy,
        "env": env(service, secret),
        "ports": [{"name": f"p{p}", "containerPort": p, "protocol": "TCP"} for p in service.ports],
        "resources": copy.deepcopy(SIDECAR_RESOURCES),
        "securityContext": dict(security_context),
    }
    if service.health:
        probe = {
            "exec": {"command": list(service.health.command)},
            "periodSeconds": service.health.interval_s,
            "timeoutSeconds": service.health.timeout_s,
            "failureThreshold": service.health.retries,
        }
        body["readinessProbe"] = {**probe, "exec": {"command": list(service.health.command)}}
        # Liveness waits longer before acting so a slow first start is not killed in a loop.
        body["livenessProbe"] = {
            **probe,
            "exec": {"command": list(service.health.command)},
            "initialDelaySeconds": service.health.interval_s * service.health.retries,
        }
    return body
