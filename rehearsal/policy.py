"""NetworkPolicy, enforced on every Pod of the rehearsal as a CNI plugin enforces it: nftables in the Pod's netns.

Each Pod's network namespace gets two tables, rewritten as one nft transaction whenever a Pod, a
Namespace, a NetworkPolicy or a Service's endpoints change (and before the Pod's first container starts):

- ``ip orz_services``: what kube-proxy does. A connection to a Service's cluster IP and port is DNATed
  in the Pod's own namespace to one Ready endpoint (pod IP, target port), chosen at random. The packet
  then leaves with the Pod's own source address to the endpoint itself, so both ends' policies see the
  real peer and port (Pod IP and target port), as with kube-proxy. A Service with no Ready endpoint is
  not translated: the connection goes to the node's forwarder (rehearsal.network), which closes it.
- ``inet orz_policy``: the networking.k8s.io/v1 rules. A Pod some policy selects for Egress (Ingress)
  is isolated in that direction: only what a rule of one of those policies allows passes (policies add
  up; a rule without peers matches every peer, without ports every port; ``ipBlock`` with ``except``;
  ``podSelector``/``namespaceSelector`` resolved to the Pods' current addresses; ports by number,
  ``endPort`` range or a container's named port, protocol TCP by default). Replies to an allowed
  connection pass (conntrack). A Pod no policy selects in a direction is open in it.

Where the specification leaves room, the rehearsal chooses, and says so here:
- Traffic from the node (10.244.0.1: the kubelet's probes, and the node's forwarder that carries what
  users send to load-balancer and ingress addresses) is always let in, as the specification says.
  Egress *to* the node's address (the stand-in kube-apiserver, the nameserver) is policed as any address,
  as Calico does: a session cannot reach the API server by the node's address.
- ``ipBlock`` matches Pod addresses too (Calico and Cilium do).
- Denied egress is dropped in the sender's own namespace, so ``connect`` fails at once with EPERM;
  denied ingress is answered with a TCP reset (ICMP admin-prohibited otherwise), so the client sees
  "connection refused" at once. Most plugins drop silently and the client waits for its timeout: here a
  denial shows at once, and still no byte gets through.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rehearsal.selectors import from_label_selector
from rehearsal.store import Obj, Store

log = logging.getLogger("rehearsal.policy")
NODE_IP = "10.244.0.1"


class PolicyError(RuntimeError):
    """The host cannot enforce policies (no nft, or the kernel refused the rules)."""


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    named_ports: Mapping[tuple[str, str], int]  # (name, protocol) -> containerPort


@dataclass(frozen=True)
class World:
    """What the rules of every Pod are computed from: one consistent read of the store."""

    pods: list[PodInfo]
    namespaces: Mapping[str, Mapping[str, str]]
    policies: list[Obj]
    services: list[tuple[str, int, list[tuple[str, int]]]]  # (cluster IP, port, endpoints (ip, target port))


def policy_types(policy: Obj) -> list[str]:
    """The directions a policy isolates, defaulted as the API server does: an empty or missing policyTypes
    means Ingress, plus Egress only when the policy has egress rules (``egress: []`` alone is not one)."""
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if spec.get("egress") else [])]


def _named_ports(pod: Obj) -> dict[tuple[str, str], int]:
    ports = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name"):
                ports[(port["name"], port.get("protocol", "TCP"))] = int(port["containerPort"])
    return ports


def _addresses(addresses: Iterable[str], family: int) -> str:
    chosen = sorted({a for a in addresses if ipaddress.ip_network(a, strict=False).version == family})
    return "{ " + ", ".join(chosen) + " }" if len(chosen) > 1 else (chosen[0] if chosen else "")


class Rules:
    """The nft rules of one Pod, from the world as it is now."""

    def __init__(self, world: World, pod: PodInfo) -> None:
        self.world = world
        self.pod = pod

    def _applying(self, kind: str) -> list[Obj]:
        return [p for p in self.world.policies if p["metadata"]["namespace"] == self.pod.namespace
                and kind in policy_types(p)
                and from_label_selector((p.get("spec") or {}).get("podSelector"))(self.pod.labels)]

    def _peer_pods(self, policy: Obj, peer: Obj) -> list[PodInfo]:
        ns_select: Callable[[Mapping[str, str]], bool] | None = None
        if "namespaceSelector" in peer:
            ns_select = from_label_selector(peer["namespaceSelector"])
        pod_select = from_label_selector(peer.get("podSelector"))
        found = []
        for other in self.world.pods:
            if ns_select is not None:
                labels = {**self.world.namespaces.get(other.namespace, {}),
                          "kubernetes.io/metadata.name": other.namespace}
                if not ns_select(labels):
                    continue
            elif other.namespace != policy["metadata"]["namespace"]:
                continue
            if pod_select(other.labels):
                found.append(other)
        return found

    def _matches(self, policy: Obj, rule: Obj, egress: bool) -> list[str]:
        """nft match expressions (one per line to emit, each then `accept`) for one rule."""
        side = "daddr" if egress else "saddr"
        peers = rule.get("to" if egress else "from") or []
        # Each target: (address match, the Pod it is when a named port must be resolved on it).
        targets: list[tuple[str, PodInfo | None]] = []
        if not peers:
            targets.append(("", None))
        for peer in peers:
            if "ipBlock" in peer:
                block = peer["ipBlock"]
                family = ipaddress.ip_network(block["cidr"], strict=False).version
                proto = "ip" if family == 4 else "ip6"
                match = f"{proto} {side} {block['cidr']}"
                excepted = _addresses(block.get("except") or [], family)
                if excepted:
                    match += f" {proto} {side} != {excepted}"
                targets.append((match, None))
            else:
                for other in self._peer_pods(policy, peer):
                    proto = "ip" if ipaddress.ip_address(other.ip).version == 4 else "ip6"
                    targets.append((f"{proto} {side} {other.ip}", other))
        entries = rule.get("ports") or []
        lines = []
        for address, other in targets:
            if not entries:
                lines.append(address)
                continue
            for entry in entries:
                protocol = str(entry.get("protocol", "TCP")).lower()
                port = entry.get("port")
                if port is None:
                    lines.append(f"{address} meta l4proto {protocol}")
                    continue
                if isinstance(port, str) and not port.isdigit():
                    # A named port is the destination Pod's: this Pod's on ingress, the peer's on egress
                    # (each Pod an ipBlock holds, when the peer is a block).
                    if not egress:
                        owners = [(self.pod, "")]
                    elif other is not None:
                        owners = [(other, "")]
                    else:
                        owners = [(p, f" ip daddr {p.ip}") for p in self.world.pods if self._in_block(address, p.ip)]
                    for owner, pin in owners:
                        number = owner.named_ports.get((port, entry.get("protocol", "TCP")))
                        if number is not None:
                            lines.append(f"{address}{pin} {protocol} dport {number}")
                    continue
                end = entry.get("endPort")
                span = f"{int(port)}-{int(end)}" if end else str(int(port))
                lines.append(f"{address} {protocol} dport {span}".strip())
        return [line.strip() for line in lines]

    @staticmethod
    def _in_block(match: str, address: str) -> bool:
        """Whether an address satisfies an ipBlock match as written above (for named ports on ipBlocks)."""
        words = match.split()
        if not words:
            return True
        ip = ipaddress.ip_address(address)
        cidr = ipaddress.ip_network(words[2], strict=False)
        if ip.version != cidr.version or ip not in cidr:
            return False
        excepted = " ".join(words[3:]).split("!=", 1)[1] if "!=" in match else ""
        return not any(ip in ipaddress.ip_network(e.strip(), strict=False)
                       for e in excepted.strip(" {}").split(",") if e.strip())

    def chain(self, egress: bool) -> list[str]:
        kind = "Egress" if egress else "Ingress"
        applying = self._applying(kind)
        if not applying:
            return []  # not isolated in this direction
        lines = ["ct state established,related accept", f"{'oifname' if egress else 'iifname'} \"lo\" accept"]
        if not egress:
            lines.append(f"ip saddr {NODE_IP} accept")  # the node: probes, its forwarder
        for policy in applying:
            for rule in (policy.get("spec") or {}).get("egress" if egress else "ingress") or []:
                lines += [f"{match} accept".strip() for match in self._matches(policy, rule, egress)]
        if egress:
            lines.append("drop")
        else:
            lines += ["meta l4proto tcp reject with tcp reset", "reject with icmpx type admin-prohibited"]
        return lines

    def services(self) -> list[str]:
        lines = []
        for address, port, endpoints in self.world.services:
            if not endpoints:
                continue
            if len(endpoints) == 1:
                target = f"{endpoints[0][0]} : {endpoints[0][1]}"
            else:
                entries = ", ".join(f"{i} : {ip} . {p}" for i, (ip, p) in enumerate(endpoints))
                target = f"numgen random mod {len(endpoints)} map {{ {entries} }}"
            lines.append(f"ip daddr {address} tcp dport {port} dnat ip to {target}")
        return lines

    def ruleset(self) -> str:
        def block(name: str, hook: str, lines: list[str], kind: str = "filter", priority: int = 0) -> str:
            body = "".join(f"    {line}\n" for line in lines)
            return f"  chain {name} {{\n    type {kind} hook {hook} priority {priority}; policy accept;\n{body}  }}\n"

        return ("table ip orz_services\ndelete table ip orz_services\n"
                "table ip orz_services {\n" + block("out", "output", self.services(), "nat", -100) + "}\n"
                "table inet orz_policy\ndelete table inet orz_policy\n"
                "table inet orz_policy {\n" + block("egress", "output", self.chain(True))
                + block("ingress", "input", self.chain(False)) + "}\n")


def read_world(store: Store, endpoints: Callable[[str, str, int], list[tuple[str, int]]],
               addresses: Mapping[str, str]) -> World:
    """Pods (their address: the network's when the kubelet attached it, else status.podIP), namespaces'
    labels, policies, and each Service port with its Ready endpoints (``endpoints`` is the forwarder's)."""
    pods = []
    for pod in store.list("pods", None)[0]:
        uid = pod["metadata"]["uid"]
        address = addresses.get(uid) or (pod.get("status") or {}).get("podIP")
        if address:
            pods.append(PodInfo(uid, pod["metadata"]["namespace"], dict(pod["metadata"].get("labels") or {}),
                                address, _named_ports(pod)))
    namespaces = {n["metadata"]["name"]: dict(n["metadata"].get("labels") or {})
                  for n in store.list("namespaces", None)[0]}
    services = []
    for svc in store.list("services", None)[0]:
        spec = svc.get("spec") or {}
        cluster_ip = spec.get("clusterIP")
        if not cluster_ip or cluster_ip == "None" or not spec.get("selector"):
            continue
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") != "TCP":
                continue
            found = endpoints(svc["metadata"]["namespace"], svc["metadata"]["name"], int(port["port"]))
            services.append((cluster_ip, int(port["port"]), sorted(found)))
    return World(pods, namespaces, store.list("networkpolicies", None)[0], sorted(services))


class Enforcer:
    """Keeps every attached Pod's nft tables equal to what the store says, until ``stop``."""

    def __init__(self, store: Store, netns: Callable[[], Mapping[str, str]],
                 endpoints: Callable[[str, str, int], list[tuple[str, int]]],
                 addresses: Callable[[], Mapping[str, str]]) -> None:
        if shutil.which("nft") is None:
            raise PolicyError("nft not found: the rehearsal enforces NetworkPolicy with nftables "
                              "(hack/setup.sh installs the nftables package)")
        self.store = store
        self.netns = netns  # pod uid -> the netns path for nsenter
        self.endpoints = endpoints
        self.addresses = addresses  # pod uid -> its address
        self.applied: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-policy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sync(self, only: str | None = None) -> None:
        """Rewrite the tables of every attached Pod whose rules changed (or of Pod ``only``, at once)."""
        with self._lock:
            world = read_world(self.store, self.endpoints, self.addresses())
            netns = self.netns()
            by_uid = {p.uid: p for p in world.pods}
            for uid, path in netns.items():
                if (only is not None and uid != only) or uid not in by_uid:
                    continue
                text = Rules(world, by_uid[uid]).ruleset()
                if self.applied.get(uid) == text:
                    continue
                done = subprocess.run(["nsenter", f"--net={path}", "nft", "-f", "-"], input=text, text=True,
                                      capture_output=True, timeout=30, check=False)
                if done.returncode != 0:
                    if uid not in self.netns():
                        continue  # the Pod went while its rules were written
                    raise PolicyError(f"nft refused the rules of pod {uid}: {done.stderr.strip()[-500:]}\n{text}")
                self.applied[uid] = text
            for uid in set(self.applied) - set(netns):
                del self.applied[uid]

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            seen = self.store.wait_for_change(seen, 0.5)
            try:
                self.sync()
            except (PolicyError, OSError, subprocess.SubprocessError, KeyError, ValueError):
                log.exception("enforcing NetworkPolicy")
            self._stop.wait(0.05)  # changes come in bursts (status, events): one rewrite per burst
