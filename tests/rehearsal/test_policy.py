"""The rehearsal's NetworkPolicy enforcement (rehearsal/policy.py) on real traffic between two network namespaces.

Two Pods, each a network namespace joined by a veth pair: a client and a server listening on two ports.
The rules the enforcer computes are loaded with nft into each namespace, and a real TCP connection from
the client says whether it opens. Needs root and nft (the rehearsal's own needs); skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from rehearsal.policy import PodInfo, Rules, World

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                                reason="network namespaces and nftables need root and nft")

CLIENT_IP, SERVER_IP, SERVICE_IP = "10.250.0.2", "10.250.0.3", "10.96.7.7"
DIAL = ("import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()\n"
        "    print('open')\n"
        "except OSError as exc:\n"
        "    print('closed', exc.errno)\n")
SERVE = ("import socket, threading\n"
         "def serve(port):\n"
         "    s = socket.create_server(('0.0.0.0', port))\n"
         "    while True:\n"
         "        s.accept()[0].close()\n"
         "for port in (80, 81):\n"
         "    threading.Thread(target=serve, args=(port,), daemon=True).start()\n"
         "print('ready', flush=True)\n"
         "threading.Event().wait()\n")


@dataclass
class Pair:
    client: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]

    @staticmethod
    def netns(proc: subprocess.Popen[bytes]) -> str:
        return f"/proc/{proc.pid}/ns/net"

    def apply(self, world: World) -> None:
        for proc, pod in ((self.client, world.pods[0]), (self.server, world.pods[1])):
            subprocess.run(["nsenter", f"--net={self.netns(proc)}", "nft", "-f", "-"], check=True, text=True,
                           input=Rules(world, pod).ruleset(), capture_output=True)

    def dial(self, host: str, port: int) -> str:
        done = subprocess.run(["nsenter", f"--net={self.netns(self.client)}", sys.executable, "-c", DIAL, host,
                               str(port)], capture_output=True, text=True, timeout=20, check=True)
        return done.stdout.strip().split()[0]


@pytest.fixture
def pair() -> Iterator[Pair]:
    holders = [subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"]) for _ in range(2)]
    server = None
    try:
        for proc in holders:
            while os.readlink(Pair.netns(proc)) == os.readlink("/proc/self/ns/net"):
                time.sleep(0.01)
        client, holder = holders
        name = f"orzt{os.getpid() % 100000}"
        subprocess.run(["ip", "link", "add", name, "netns", str(client.pid), "type", "veth", "peer", "name",
                        "eth0", "netns", str(holder.pid)], check=True)
        for proc, dev, address in ((client, name, CLIENT_IP), (holder, "eth0", SERVER_IP)):
            for args in (["addr", "add", f"{address}/24", "dev", dev], ["link", "set", dev, "up"],
                         ["link", "set", "lo", "up"]):
                subprocess.run(["nsenter", f"--net={Pair.netns(proc)}", "ip", *args], check=True)
        # Cluster IPs route to the server's side, as the rehearsal's pods route everything to the bridge.
        subprocess.run(["nsenter", f"--net={Pair.netns(client)}", "ip", "route", "add", "default", "via",
                        SERVER_IP], check=True)
        server = subprocess.Popen(["nsenter", f"--net={Pair.netns(holder)}", sys.executable, "-c", SERVE],
                                  stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        yield Pair(client, holder)
    finally:
        for proc in [*holders, *([server] if server else [])]:
            proc.kill()
            proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


def world(policies: list[dict[str, Any]], *, server_labels: dict[str, str] | None = None,
          client_ns: str = "sessions") -> World:
    client = PodInfo("c", client_ns, {"app": "session"}, CLIENT_IP, {})
    server = PodInfo("s", "system", server_labels or {"app": "api"}, SERVER_IP, {("http", "TCP"): 80})
    return World([client, server], {"sessions": {}, "system": {"tier": "control"}}, policies,
                 [(SERVICE_IP, 8080, [(SERVER_IP, 80)])])


def policy(namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": "p"}, "spec": spec}


def test_no_policy_leaves_every_port_open_and_services_reach_their_endpoint(pair: Pair) -> None:
    pair.apply(world([]))
    assert (pair.dial(SERVER_IP, 80), pair.dial(SERVER_IP, 81), pair.dial(SERVICE_IP, 8080)) == \
        ("open", "open", "open")


def test_egress_isolation_lets_through_only_what_a_rule_allows(pair: Pair) -> None:
    """The chart's shape: the API Pods' named HTTP port by selectors, the internet minus private ranges."""
    egress = policy("sessions", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {"matchLabels": {"tier": "control"}},
                 "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]}}],
         "ports": [{"port": "http"}]},
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]})
    pair.apply(world([egress]))
    # The Service is judged as its endpoint (translated first, as kube-proxy does): port 80 of an API Pod.
    assert (pair.dial(SERVER_IP, 80), pair.dial(SERVER_IP, 81), pair.dial(SERVICE_IP, 8080)) == \
        ("open", "closed", "open")
    # The same Pod under other labels is no longer a peer: only the ipBlock is left, and it excepts it.
    pair.apply(world([egress], server_labels={"app": "postgresql"}))
    assert (pair.dial(SERVER_IP, 80), pair.dial(SERVICE_IP, 8080)) == ("closed", "closed")


def test_ingress_isolation_sees_the_real_client_also_through_a_service(pair: Pair) -> None:
    """Only gateway Pods may connect: a session's connection is refused, straight or by the Service IP."""
    ingress = policy("system", {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "gateway"}}}],
         "ports": [{"protocol": "TCP", "port": 80}]}]})
    pair.apply(world([ingress]))
    assert (pair.dial(SERVER_IP, 80), pair.dial(SERVICE_IP, 8080)) == ("closed", "closed")
    # From any Pod of the sessions namespace, ports 80 to 81 (endPort): both open.
    wider = policy("system", {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sessions"}}}],
         "ports": [{"port": 80, "endPort": 81}]}]})
    pair.apply(world([ingress, wider]))
    assert (pair.dial(SERVER_IP, 80), pair.dial(SERVER_IP, 81), pair.dial(SERVICE_IP, 8080)) == \
        ("open", "open", "open")
    # A policy that selects the Pod and allows nothing (no ingress rules) closes it to everyone.
    deny_all = policy("system", {"podSelector": {}, "policyTypes": ["Ingress"]})
    pair.apply(world([deny_all]))
    assert pair.dial(SERVER_IP, 80) == "closed"
