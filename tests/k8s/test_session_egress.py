"""Where agent code in a session Pod can connect: the chart's policies and the API's per-session one,
evaluated for a table of destinations (tests/k8s/netpol.py stands in for the CNI plugin).

These evaluate the policies' text for many values files at once; what a Pod's traffic actually meets is
the rehearsal's step "a session Pod reaches the API's HTTP port only" (rehearsal/steps.py), where the
policies are enforced (rehearsal/policy.py) and connections are made from inside a real session Pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.instances.providers.kubernetes import manifests
from tests.k8s.conftest import make_spec
from tests.k8s.helm import CHART, RELEASE_NS, render, template
from tests.k8s.netpol import Cluster, Pod

VALUES_TEST = Path(__file__).with_name("values-test.yaml")
VALUES_REHEARSAL = CHART.parents[1] / "hack" / "rehearsal-values.yaml"


def template_labels(objs: list[dict[str, Any]], kind: str, component: str) -> dict[str, str]:
    (obj,) = [o for o in objs if o["kind"] == kind
              and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return dict(obj["spec"]["template"]["metadata"]["labels"])


class World:
    """The rendered chart installed in RELEASE_NS, one running session, and the cluster around them."""

    def __init__(self, *values: str) -> None:
        objs = render(*values)
        self.policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
        api_env = {e["name"]: e.get("value") for e in
                   next(o for o in objs if o["kind"] == "Deployment"
                        and o["metadata"]["labels"]["app.kubernetes.io/component"] == "api")
                   ["spec"]["template"]["spec"]["containers"][0]["env"]}
        self.sessions_ns = api_env["ORZ_K8S_NAMESPACE"]
        config = manifests.ClusterConfig(
            namespace=self.sessions_ns,
            gateway_pod_labels=dict(t.split("=") for t in api_env["ORZ_K8S_GATEWAY_SELECTOR"].split(",")),
            gateway_namespace_labels=dict(t.split("=") for t in
                                          api_env["ORZ_K8S_GATEWAY_NAMESPACE_SELECTOR"].split(",")))
        # What the API creates for each session (KubernetesProvider): its Ingress-only policy and Pod.
        spec, other = make_spec("brave-otter-42"), make_spec("quiet-heron-7")
        self.policies += [manifests.network_policy(s, config) for s in (spec, other)]
        ns = self.sessions_ns
        self.session = Pod(ns, manifests.pod(spec, config)["metadata"]["labels"], "10.244.2.10", {"ssh": 2222})
        self.other_session = Pod(ns, manifests.pod(other, config)["metadata"]["labels"], "10.244.2.11",
                                 {"ssh": 2222})
        self.pods = {
            "kube-dns": Pod("kube-system", {"k8s-app": "kube-dns"}, "10.244.0.3", {"dns": 53}),
            "api": Pod(RELEASE_NS, template_labels(objs, "Deployment", "api"), "10.244.1.10", {"http": 8080}),
            "gateway": Pod(RELEASE_NS, template_labels(objs, "Deployment", "gateway"), "10.244.1.30"),
            "scheduler": Pod(RELEASE_NS, template_labels(objs, "Deployment", "scheduler"), "10.244.1.40"),
            "git-fixture": Pod(RELEASE_NS, {"app.kubernetes.io/name": "git-fixture"}, "10.244.1.50"),
            "other-session": self.other_session,
        }
        if any(o["kind"] == "StatefulSet" for o in objs):
            self.pods["postgresql"] = Pod(RELEASE_NS, template_labels(objs, "StatefulSet", "postgresql"),
                                          "10.244.1.20")
        self.cluster = Cluster({}, self.policies)

    def from_session(self, dst: str, port: int, protocol: str = "TCP") -> bool:
        return self.cluster.connects(self.session, self.pods.get(dst) or dst, port, protocol)


# (what, destination: a Pod of the World or an address, port, protocol, allowed). Services appear as
# the endpoint they forward to: the API's internal Service is the API pods' port 8080, `kubernetes`
# in the default namespace is the kube-apiserver at the node's address (kind: 172.18.0.2:6443).
DESTINATIONS = [
    ("cloud metadata service", "169.254.169.254", 80, "TCP", False),
    ("cloud metadata service, IPv6 (AWS)", "fd00:ec2::254", 80, "TCP", False),
    ("Alibaba Cloud metadata service", "100.100.100.200", 80, "TCP", False),
    ("internet, HTTPS", "8.8.8.8", 443, "TCP", True),
    ("internet, a git host over SSH", "140.82.121.4", 22, "TCP", True),
    ("internet, IPv6", "2606:4700:4700::1111", 443, "TCP", True),
    ("cluster DNS, UDP", "kube-dns", 53, "UDP", True),
    ("cluster DNS, TCP", "kube-dns", 53, "TCP", True),
    ("cluster DNS's metrics", "kube-dns", 9153, "TCP", False),
    ("the API's internal Service: runner heartbeats and logs", "api", 8080, "TCP", True),
    ("the API's metrics port", "api", 9101, "TCP", False),
    ("PostgreSQL", "postgresql", 5432, "TCP", False),
    ("a gateway's SSH port", "gateway", 2222, "TCP", False),
    ("a gateway's metrics", "gateway", 9102, "TCP", False),
    ("the scheduler's metrics", "scheduler", 9103, "TCP", False),
    ("kube-apiserver (a node address)", "172.18.0.2", 6443, "TCP", False),
    ("a kubelet", "172.18.0.2", 10250, "TCP", False),
    ("the kube-apiserver's Service address, before translation", "10.96.0.1", 443, "TCP", False),
    ("another session's sshd", "other-session", 2222, "TCP", False),
    ("a private forge (not allowed by default)", "10.20.0.15", 443, "TCP", False),
    ("an in-cluster git server (not allowed by default)", "git-fixture", 9418, "TCP", False),
]


@pytest.fixture(scope="module", params=["default", "values-test"])
def world(request: pytest.FixtureRequest) -> World:
    return World(*(["-f", str(VALUES_TEST)] if request.param == "values-test" else []))


@pytest.mark.parametrize(("what", "dst", "port", "protocol", "allowed"), DESTINATIONS,
                         ids=[d[0] for d in DESTINATIONS])
def test_session_pod_reaches_only_dns_the_api_and_the_internet(world: World, what: str, dst: str, port: int,
                                                                protocol: str, allowed: bool) -> None:
    if dst == "postgresql" and dst not in world.pods:
        pytest.skip("no bundled PostgreSQL in these values")
    assert world.from_session(dst, port, protocol) is allowed, what


def test_the_gateway_still_reaches_the_runner_and_nothing_else_does(world: World) -> None:
    gateway = world.pods["gateway"]
    assert world.cluster.connects(gateway, world.session, 2222)
    assert not world.cluster.connects(gateway, world.session, 8080)
    assert not world.cluster.connects(world.pods["api"], world.session, 2222)


def test_sidecars_are_held_to_the_same_egress() -> None:
    """Users' services (postgres:16 beside the runner) share the session Pod; any other Pod there too."""
    w = World()
    stray = Pod(w.sessions_ns, {"app": "anything"}, "10.244.2.99")
    assert not w.cluster.connects(stray, "169.254.169.254", 80)
    assert not w.cluster.connects(stray, w.pods["api"], 9101)
    assert w.cluster.connects(stray, "8.8.8.8", 443)


def test_without_network_policies_everything_is_open() -> None:
    """What the policy closes: with networkPolicy.enabled=false the metadata service is reachable."""
    w = World("--set", "networkPolicy.enabled=false")
    assert not [p for p in w.policies if p["metadata"]["namespace"] == w.sessions_ns
                and "Egress" in p["spec"].get("policyTypes", [])]
    assert w.from_session("169.254.169.254", 80)


def test_values_allow_an_internal_forge_by_address() -> None:
    w = World("--set", "networkPolicy.sessionEgress.allowCidrs={10.20.0.15/32}")
    assert w.from_session("10.20.0.15", 443)
    assert w.from_session("10.20.0.15", 22)
    assert not w.from_session("10.20.0.16", 443)
    assert not w.from_session("169.254.169.254", 80)


def test_rehearsal_values_allow_the_git_fixture_pod_on_the_git_port_only() -> None:
    w = World("-f", str(VALUES_REHEARSAL))
    assert w.from_session("git-fixture", 9418)
    assert not w.from_session("git-fixture", 22)
    assert not w.from_session("api", 9101)


def test_a_public_kube_apiserver_is_denied_when_named() -> None:
    assert World().from_session("203.0.113.10", 443)
    w = World("--set", "networkPolicy.sessionEgress.apiServerCidrs={203.0.113.10/32}")
    assert not w.from_session("203.0.113.10", 443)
    assert w.from_session("203.0.113.11", 443)


def test_pod_and_service_ranges_outside_rfc1918_are_denied_when_given() -> None:
    """A cluster whose pods use public-looking addresses (198.18.0.0/15): set podCidr and serviceCidr."""
    w = World()
    assert w.from_session("198.18.4.7", 5432)
    w = World("--set", "networkPolicy.sessionEgress.podCidr=198.18.0.0/16",
              "--set", "networkPolicy.sessionEgress.serviceCidr=198.19.0.0/16")
    assert not w.from_session("198.18.4.7", 5432)
    assert not w.from_session("198.19.0.1", 443)
    assert w.from_session("8.8.8.8", 443)


def test_the_evaluator_refuses_an_except_outside_its_cidr() -> None:
    policy = {"metadata": {"name": "bad", "namespace": "x"},
              "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]}]}}
    with pytest.raises(ValueError, match="not inside"):
        Cluster({}, [policy])


def test_sessions_sharing_the_release_namespace_are_refused() -> None:
    """The policy covers every Pod of the sessions namespace: there it would cover the control plane."""
    done = template("--set", f"sessions.namespace={RELEASE_NS}")
    assert done.returncode != 0
    assert "a namespace of their own" in done.stderr
    assert template("--set", f"sessions.namespace={RELEASE_NS}",
                    "--set", "networkPolicy.sessionEgress.enabled=false").returncode == 0
