"""A NetworkPolicy evaluator: would a cluster that enforces these policies let this connection through?

It stands in for the CNI plugin (Calico, Cilium, kindnet...) that enforces NetworkPolicy in a real
cluster, which no test here has. It implements the networking.k8s.io/v1 semantics:

- A policy applies to the Pods of its own namespace that its ``podSelector`` matches, for the
  directions in ``policyTypes`` (absent: Ingress, plus Egress when the spec has ``egress``).
- A Pod no policy applies to in a direction is open in that direction; otherwise a connection is let
  through only when some rule of some applying policy allows it (policies add up, none denies).
- A rule with no ``to``/``from`` matches every peer, one with no ``ports`` every port. A peer is an
  ``ipBlock`` (the address is in ``cidr`` and in none of ``except``), or a ``namespaceSelector`` and/or
  ``podSelector`` (a Pod; a lone ``podSelector`` means the policy's namespace). Selectors take
  ``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist); ``{}`` matches everything.
- A port entry matches its protocol (default TCP) and its number, range (``endPort``) or the
  destination container's named port; no ``port`` means every port of the protocol.
- A connection needs the source's egress and, when the destination is a Pod, its ingress.

Where the specification leaves it to the plugin, the evaluator takes the reading that lets more
through, so a test that finds a connection denied holds on every plugin: ``ipBlock`` also matches Pod
addresses (Calico and Cilium do; the specification only promises it for cluster-external ones).
Services are evaluated as the endpoint they forward to (kube-proxy or eBPF translate the address
before the policy sees the packet), so callers give the endpoint Pod or address and its target port.
Replies to an allowed connection are allowed, as everywhere: only the opening direction is asked.
It also rejects an ``except`` that is not strictly inside its ``cidr``, as the API server does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Labels = Mapping[str, str]
Policy = Mapping[str, Any]


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Labels
    ip: str
    # Named container ports, name -> number (for port entries that name a port).
    named_ports: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Cluster:
    """The namespaces' labels and every NetworkPolicy in the cluster."""

    namespaces: Mapping[str, Labels]
    policies: Sequence[Policy]

    def __post_init__(self) -> None:
        for policy in self.policies:
            check_policy(policy)

    def ns_labels(self, namespace: str) -> Labels:
        # Every namespace carries kubernetes.io/metadata.name (set by the API server since 1.21).
        return {**self.namespaces.get(namespace, {}), "kubernetes.io/metadata.name": namespace}

    def connects(self, src: Pod, dst: Pod | str, port: int, protocol: str = "TCP") -> bool:
        """Whether a connection from ``src`` to ``dst`` (a Pod or an address) on ``port`` opens."""
        if not self._direction(src, "Egress", dst, port, protocol):
            return False
        return not isinstance(dst, Pod) or self._direction(dst, "Ingress", src, port, protocol)

    def _direction(self, pod: Pod, kind: str, peer: Pod | str, port: int, protocol: str) -> bool:
        applying = [p for p in self.policies if p["metadata"]["namespace"] == pod.namespace
                    and kind in policy_types(p) and selects(p["spec"].get("podSelector") or {}, pod.labels)]
        if not applying:
            return True
        key, peers_key = ("egress", "to") if kind == "Egress" else ("ingress", "from")
        dst = peer if kind == "Egress" else pod
        for policy in applying:
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peers_key) or []
                if peers and not any(self._peer(policy, p, peer) for p in peers):
                    continue
                entries = rule.get("ports") or []
                if not entries or any(port_matches(e, dst, port, protocol) for e in entries):
                    return True
        return False

    def _peer(self, policy: Policy, peer: Mapping[str, Any], other: Pod | str) -> bool:
        address = other.ip if isinstance(other, Pod) else other
        if "ipBlock" in peer:
            return in_block(peer["ipBlock"], address)
        if not isinstance(other, Pod):
            return False
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], self.ns_labels(other.namespace)):
                return False
        elif other.namespace != policy["metadata"]["namespace"]:
            return False
        return selects(peer.get("podSelector") or {}, other.labels)


def policy_types(policy: Policy) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if "egress" in spec else [])]


def selects(selector: Mapping[str, Any], labels: Labels) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def in_block(block: Mapping[str, Any], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    cidr = ipaddress.ip_network(block["cidr"])
    if ip.version != cidr.version or ip not in cidr:
        return False
    return not any(ip in ipaddress.ip_network(e) for e in block.get("except") or []
                   if ipaddress.ip_network(e).version == ip.version)


def port_matches(entry: Mapping[str, Any], dst: Pod | str, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return isinstance(dst, Pod) and dst.named_ports.get(wanted) == port
    return wanted <= port <= entry.get("endPort", wanted)


def check_policy(policy: Policy) -> None:
    """What the API server refuses in a policy's ipBlocks (``except`` strictly inside ``cidr``)."""
    spec = policy["spec"]
    for rule in [*(spec.get("egress") or []), *(spec.get("ingress") or [])]:
        for peer in [*(rule.get("to") or []), *(rule.get("from") or [])]:
            block = peer.get("ipBlock")
            if not block:
                continue
            cidr = ipaddress.ip_network(block["cidr"])
            for entry in block.get("except") or []:
                sub = ipaddress.ip_network(entry)
                if sub.version != cidr.version or not sub.subnet_of(cidr) or sub == cidr:  # type: ignore[arg-type]
                    raise ValueError(f"{policy['metadata']['name']}: except {entry} is not inside {cidr}")
