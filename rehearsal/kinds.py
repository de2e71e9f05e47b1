"""The resource kinds the rehearsal's API server knows: REST plural, group/version, kind, scope."""

from __future__ import annotations

from dataclasses import dataclass

# The Kubernetes version every stored object is validated against (strict: unknown fields fail).
K8S_VERSION = "1.33.0"


@dataclass(frozen=True)
class Kind:
    plural: str
    group: str  # "" for the core group
    version: str
    kind: str
    namespaced: bool = True
    # Custom resources (Prometheus Operator) are not in kubernetes-validate's schemas.
    validate: bool = True
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


KINDS: tuple[Kind, ...] = (
    Kind("namespaces", "", "v1", "Namespace", namespaced=False),
    Kind("pods", "", "v1", "Pod"),
    Kind("configmaps", "", "v1", "ConfigMap"),
    Kind("secrets", "", "v1", "Secret"),
    Kind("persistentvolumeclaims", "", "v1", "PersistentVolumeClaim"),
    Kind("services", "", "v1", "Service"),
    Kind("endpoints", "", "v1", "Endpoints"),
    Kind("serviceaccounts", "", "v1", "ServiceAccount"),
    Kind("events", "", "v1", "Event"),
    Kind("deployments", "apps", "v1", "Deployment"),
    Kind("replicasets", "apps", "v1", "ReplicaSet"),
    Kind("statefulsets", "apps", "v1", "StatefulSet"),
    Kind("daemonsets", "apps", "v1", "DaemonSet"),
    Kind("jobs", "batch", "v1", "Job"),
    Kind("networkpolicies", "networking.k8s.io", "v1", "NetworkPolicy"),
    Kind("ingresses", "networking.k8s.io", "v1", "Ingress"),
    Kind("poddisruptionbudgets", "policy", "v1", "PodDisruptionBudget"),
    Kind("roles", "rbac.authorization.k8s.io", "v1", "Role"),
    Kind("rolebindings", "rbac.authorization.k8s.io", "v1", "RoleBinding"),
    Kind("clusterroles", "rbac.authorization.k8s.io", "v1", "ClusterRole", namespaced=False),
    Kind("clusterrolebindings", "rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", namespaced=False),
    Kind("leases", "coordination.k8s.io", "v1", "Lease"),
    Kind("servicemonitors", "monitoring.coreos.com", "v1", "ServiceMonitor", validate=False),
    Kind("prometheusrules", "monitoring.coreos.com", "v1", "PrometheusRule", validate=False),
)

BY_PLURAL: dict[tuple[str, str], Kind] = {(k.group, k.plural): k for k in KINDS}
BY_KIND: dict[tuple[str, str], Kind] = {(k.api_version, k.kind): k for k in KINDS}
# Plural alone, for the test controls (unique across the groups above).
PLURALS: dict[str, Kind] = {k.plural: k for k in KINDS}


def for_object(obj: dict) -> Kind:
    """The Kind of a manifest, or KeyError naming what is unknown."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key not in BY_KIND:
        raise KeyError(f"the rehearsal's API server does not serve {key[0]} {key[1]}")
    return BY_KIND[key]
