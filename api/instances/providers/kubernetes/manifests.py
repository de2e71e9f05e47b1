"""Pure builders for one session's Kubernetes objects: plain dicts, no I/O, no client types.

Object graph per session (all in the sessions namespace, all named from the session id):

- ConfigMap ``orz-<id>``: the **root**. It owns every other object through ``ownerReferences``, so
  deleting it garbage-collects the rest. It is a ConfigMap and not the PVC because a PVC in use carries
  the ``pvc-protection`` finalizer: deleting a PVC that owns its own Pod would wait on the Pod, which
  background garbage collection only removes after the owner is gone.
- Secret ``orz-<id>-env``: ``ORZ_RUNNER_TOKEN`` and the session's secret env, read via ``envFrom``.
- PersistentVolumeClaim ``orz-<id>-ws``: ``/workspace``, kept when the session stops.
- NetworkPolicy ``orz-<id>``: only gateway pods may reach the runner's SSH port. Egress is the chart's
  namespace-wide policy (charts/orzbob-cloud/templates/sessions/egress-networkpolicy.yaml).
- Pod ``orz-<id>``: the runner and any sidecars. Stop deletes just this.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.cloud_yaml import DEFAULT_MAX_SERVICES, RUNNER_SSH_PORT
from api.instances.providers.base import ComputeSpec
from api.instances.providers.kubernetes import names, resources, sidecars
from api.schemas import CLOUD_CONFIG_PATH, ENV_NAME_RE, RunnerSpec, services_digest
from api.settings import Settings

RUNNER_UID = 1000
WORKSPACE = "/workspace"
HOME = "/home/orzbob"
STATE_DIR = "/run/orz"
SCROLLBACK_FILE = f"{WORKSPACE}/.git/orz-scrollback.txt"
# The kubelet kills a stopped Pod's containers this long after their SIGTERM (the runner's WIP save and
# its final recording upload fit well inside).
RUNNER_TERMINATION_GRACE_S = 30
TOKEN_ENV = "ORZ_RUNNER_TOKEN"  # noqa: S105  # nosec B105  # a variable name, not a value


class ManifestError(ValueError):
    """The spec cannot become valid objects; the message is safe to show the user."""


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster-wide knobs the builders need, taken from Settings."""

    namespace: str = "orz-sessions"
    runner_image: str = "ghcr.io/orzbob/orzbob-cloud-runner:latest"
    storage_class: str = ""
    workspace_size: str = "10Gi"
    gateway_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/component": "gateway"}
    )
    gateway_namespace_labels: Mapping[str, str] = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "orz-system"}
    )
    image_pull_policy: str = "IfNotPresent"
    runner_fast_path: bool = True  # settings.runner_fast_path, passed to each runner in its environment
    service_image_registries: tuple[str, ...] = sidecars.DEFAULT_REGISTRIES  # settings.k8s_service_image_registries
    service_image_pull_policy: str = "Always"  # settings.k8s_service_image_pull_policy

    @classmethod
    def from_settings(cls, settings: Settings) -> ClusterConfig:
        return cls(
            namespace=settings.k8s_namespace,
            runner_image=settings.k8s_runner_image,
            storage_class=settings.k8s_storage_class,
            workspace_size=settings.k8s_workspace_size,
            gateway_pod_labels=names.parse_selector(settings.k8s_gateway_selector),
            gateway_namespace_labels=names.parse_selector(settings.k8s_gateway_namespace_selector),
            runner_fast_path=settings.runner_fast_path,
            service_image_registries=settings.service_image_registries(),
            service_image_pull_policy=settings.k8s_service_image_pull_policy,
        )


@dataclass(frozen=True)
class SessionObjects:
    root: dict[str, Any]
    secret: dict[str, Any]
    pvc: dict[str, Any]
    network_policy: dict[str, Any]
    pod: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        return [self.root, self.secret, self.pvc, self.network_policy, self.pod]


def _meta(spec: ComputeSpec, config: ClusterConfig, name: str, component: str,
          owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": config.namespace,
        "labels": names.labels(spec.session_id, spec.org_id, component),
    }
    if owner_uid:
        meta["ownerReferences"] = [{
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": names.root_name(spec.session_id),
            "uid": owner_uid,
            # False: collecting dependents must not need update rights on the owner's finalizers.
            "blockOwnerDeletion": False,
        }]
    return meta


def root_config_map(spec: ComputeSpec, config: ClusterConfig) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec, config, names.root_name(spec.session_id), "session", None),
        "data": {"session": spec.session_id, "org": spec.org_id, "tier": spec.tier},
    }


def secret(spec: ComputeSpec, config: ClusterConfig, owner_uid: str | None = None) -> dict[str, Any]:
    if TOKEN_ENV in spec.secret_env:
        raise ManifestError(f"secret env may not set {TOKEN_ENV}")
    bad = sorted(k for k in spec.secret_env if not ENV_NAME_RE.match(k))
    if bad:
        raise ManifestError(f"secret env names must be letters, digits and '_': {', '.join(bad)[:200]}")
    values = {TOKEN_ENV: spec.runner_token, **spec.secret_env}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(spec, config, names.secret_name(spec.session_id), "secret", owner_uid),
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())},
    }


def pvc(spec: ComputeSpec, config: ClusterConfig, owner_uid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": config.workspace_size}},
    }
    if config.storage_class:
        body["storageClassName"] = config.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(spec, config, names.pvc_name(spec.session_id), "workspace", owner_uid),
        "spec": body,
    }


def network_policy(spec: ComputeSpec, config: ClusterConfig, owner_uid: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(spec, config, names.network_policy_name(spec.session_id), "network-policy",
                          owner_uid),
        "spec": {
            "podSelector": {"matchLabels": {**names.session_selector(spec.session_id),
                                            "app.kubernetes.io/component": "runner"}},
            # Ingress only: listing Egress here would close it. The chart's session-egress policy, one
            # for the whole namespace, limits egress to DNS, the API pods and the internet.
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{
                    # One peer with both selectors: gateway pods *in* the control-plane namespace.
                    "namespaceSelector": {"matchLabels": dict(config.gateway_namespace_labels)},
                    "podSelector": {"matchLabels": dict(config.gateway_pod_labels)},
                }],
                "ports": [{"protocol": "TCP", "port": RUNNER_SSH_PORT}],
            }],
        },
    }


def runner_spec(spec: ComputeSpec) -> RunnerSpec:
    return spec.runner_spec(
        ssh_host="0.0.0.0",  # noqa: S104  # nosec B104  # the NetworkPolicy, not the bind address, limits who connects
        ssh_port=RUNNER_SSH_PORT,
        workspace=WORKSPACE,
        state_dir=STATE_DIR,
        # The state dir is an emptyDir that a stop (the Pod deleted) throws away; the workspace volume stays.
        # Inside .git the pane's text is neither a workspace file nor unsaved work, and git ignores it.
        scrollback_file=SCROLLBACK_FILE,
        # The Pod runs the services; the runner compares them with .orz/cloud.yaml and reports a difference.
        sidecars="pod",
        pod_services_digest=services_digest(sidecars.listed(spec.services)),
    )


def sidecar_containers(services: sidecars.RawServices, session_id: str, secret_keys: Collection[str],
                       max_services: int = DEFAULT_MAX_SERVICES,
                       registries: Collection[str] = sidecars.DEFAULT_REGISTRIES,
                       pull_policy: str = "Always") -> list[dict[str, Any]]:
    """The services as containers beside the runner; ManifestError names .orz/cloud.yaml and the key."""
    source = sidecars.SecretSource(names.secret_name(session_id), frozenset(secret_keys))
    try:
        parsed = sidecars.parse_services(services, reserved_ports=(RUNNER_SSH_PORT,), max_services=max_services,
                                         registries=registries)
        # Sidecar images are the user's choice and may write anywhere in their own filesystem.
        return [sidecars.container(s, container_security(False), source, pull_policy) for s in parsed]
    except sidecars.ServiceError as exc:
        raise ManifestError(f"{CLOUD_CONFIG_PATH}: {exc}") from None


def container_security(read_only_root: bool) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNNER_UID,
        "runAsGroup": RUNNER_UID,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _runner_container(spec: ComputeSpec, config: ClusterConfig) -> dict[str, Any]:
    try:
        limits = resources.requirements(spec.tier, spec.resources)
    except resources.ResourceError as exc:
        raise ManifestError(str(exc)) from exc
    try:
        spec_json = runner_spec(spec).model_dump_json()
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise ManifestError(f"the runner spec is not valid ({fields})") from None
    return {
        "name": names.RUNNER_CONTAINER,
        "image": config.runner_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["orz", "runner"],
        "ports": [{"name": "ssh", "containerPort": RUNNER_SSH_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "ORZ_RUNNER_SPEC", "value": spec_json},
            {"name": "HOME", "value": HOME},
            # The gateway dials the pod IP, which is only known once the Pod is scheduled.
            {"name": "ORZ_RUNNER_ADVERTISE_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "ORZ_RUNNER_FAST_PATH", "value": str(config.runner_fast_path).lower()},
        ],
        # The runner token and secret values arrive from the Secret, never inline in the Pod.
        "envFrom": [{"secretRef": {"name": names.secret_name(spec.session_id)}}],
        "resources": limits,
        "readinessProbe": {
            "tcpSocket": {"port": "ssh"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "securityContext": container_security(read_only_root=True),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108  # nosec B108  # an emptyDir, private to the pod
            {"name": "home", "mountPath": HOME},
            {"name": "state", "mountPath": STATE_DIR},
        ],
    }


def pod(spec: ComputeSpec, config: ClusterConfig, generation: int = 1,
        owner_uid: str | None = None) -> dict[str, Any]:
    side = sidecar_containers(spec.services, spec.session_id, spec.secret_env, spec.max_services,
                              config.service_image_registries, config.service_image_pull_policy)
    runner = _runner_container(spec, config)
    containers = [runner, *side]
    meta = _meta(spec, config, names.pod_name(spec.session_id), "runner", owner_uid)
    meta["annotations"] = {names.GENERATION_ANNOTATION: str(generation)}
    body: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": RUNNER_TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": [
            {"name": "workspace",
             "persistentVolumeClaim": {"claimName": names.pvc_name(spec.session_id)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
            {"name": "home", "emptyDir": {"sizeLimit": "2Gi"}},
            {"name": "state", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        ],
    }
    if resources.GPU_RESOURCE in runner["resources"]["limits"]:
        # GPU nodes are commonly tainted so that only pods asking for a GPU land there.
        body["tolerations"] = [{"key": resources.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def build(spec: ComputeSpec, config: ClusterConfig, *, generation: int = 1,
          owner_uid: str | None = None) -> SessionObjects:
    """Every object of one session. ``owner_uid`` is the root ConfigMap's uid, known once it exists."""
    return SessionObjects(
        root=root_config_map(spec, config),
        secret=secret(spec, config, owner_uid),
        pvc=pvc(spec, config, owner_uid),
        network_policy=network_policy(spec, config, owner_uid),
        pod=pod(spec, config, generation, owner_uid),
    )


def redacted(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log: Secret values replaced."""
    out = copy.deepcopy(dict(obj))
    for key in ("data", "stringData"):
        if out.get("kind") == "Secret" and key in out:
            out[key] = dict.fromkeys(out[key], "<redacted>")
    return out
