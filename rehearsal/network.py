"""The rehearsal's cluster network on one machine: a bridge, a network namespace per Pod, Services.

Pods get their own network namespace, held by a pause process as in Kubernetes (no name under
/run/netns that another program's ``ip -all netns delete`` could take away), with a veth on the bridge
``orzr0`` and an address from the pod range, so every container binds its ports as in a cluster (two API
replicas both listen on 0.0.0.0:8080). Service cluster IPs are extra addresses on the bridge where a
round-robin TCP forwarder sends each connection to a Ready endpoint (a Pod's own connections to a cluster
IP never reach it: rehearsal.policy translates them in the Pod's namespace, as kube-proxy would, and the
forwarder serves the node, and Services with no Ready endpoint); LoadBalancer Services also get an
address of their own from the load-balancer range, listening on the Service's port, which is what users
connect to. Names resolve through an /etc/hosts per Pod (the kubelet writes it) instead of cluster DNS.
Nothing here is routed off the machine: the bridge has no uplink and forwarding stays off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from rehearsal.controllers import is_ready
from rehearsal.store import Obj, Store

log = logging.getLogger("rehearsal.network")

BRIDGE = "orzr0"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
GATEWAY_IP = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/16"
LB_CIDR = ipaddress.ip_network("10.97.0.0/24")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class NetworkError(RuntimeError):
    """The host refused to make the rehearsal's network (needs root, iproute2)."""


@dataclass
class PodNetwork:
    pause: subprocess.Popen[bytes]
    address: str
    host_veth: str

    @property
    def namespace(self) -> str:
        """The network namespace as a path for `nsenter --net=`."""
        return f"/proc/{self.pause.pid}/ns/net"


def _die_with_parent() -> None:
    """Runs in the pause process before exec: it dies with the rehearsal, never outlives it."""
    import ctypes
    import signal as signals

    ctypes.CDLL(None).prctl(1, signals.SIGKILL)  # PR_SET_PDEATHSIG


def in_pod(pod: PodNetwork, *args: str) -> None:
    subprocess.run(["nsenter", f"--net={pod.namespace}", "ip", *args], capture_output=True, text=True,
                   check=True, timeout=30)


@dataclass
class Network:
    """The bridge and the pods' namespaces; ``close`` removes everything it made."""

    prefix: str = "orzr"
    pods: dict[str, PodNetwork] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._addresses = (str(a) for a in itertools.islice(POD_CIDR.hosts(), 9, None))
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._extra_addresses: list[str] = []

    def up(self) -> None:
        self.close()  # leftovers of an interrupted run
        try:
            ip("link", "add", BRIDGE, "type", "bridge")
            ip("addr", "add", f"{GATEWAY_IP}/{POD_CIDR.prefixlen}", "dev", BRIDGE)
            ip("link", "set", BRIDGE, "up")
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise NetworkError(f"cannot make the bridge {BRIDGE} (root and iproute2 needed): "
                               f"{detail.strip()}") from None

    def add_address(self, address: str) -> None:
        """A cluster or load-balancer IP on the bridge, so the host answers for it."""
        with self._lock:
            if address in self._extra_addresses:
                return
            ip("addr", "add", f"{address}/32", "dev", BRIDGE, check=False)
            self._extra_addresses.append(address)

    def attach(self, pod_uid: str) -> PodNetwork:
        with self._lock:
            n = next(self._counter)
            veth, address = f"{self.prefix}{n}h", next(self._addresses)
        pause = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"], preexec_fn=_die_with_parent,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pod = PodNetwork(pause, address, veth)
        # unshare has made the namespace once /proc/<pid>/ns/net differs from ours.
        deadline = time.monotonic() + 5
        while os.readlink(pod.namespace) == os.readlink("/proc/self/ns/net") and time.monotonic() < deadline:
            time.sleep(0.01)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(pause.pid))
        ip("link", "set", veth, "master", BRIDGE, "up")
        in_pod(pod, "addr", "add", f"{address}/{POD_CIDR.prefixlen}", "dev", "eth0")
        in_pod(pod, "link", "set", "eth0", "up")
        in_pod(pod, "link", "set", "lo", "up")
        in_pod(pod, "route", "add", "default", "via", GATEWAY_IP)
        self.pods[pod_uid] = pod
        return pod

    def detach(self, pod_uid: str) -> None:
        pod = self.pods.pop(pod_uid, None)
        if pod is not None:
            ip("link", "del", pod.host_veth, check=False)
            pod.pause.kill()
            pod.pause.wait(5)

    def close(self) -> None:
        for uid in list(self.pods):
            self.detach(uid)
        ip("link", "del", BRIDGE, check=False)
        self._extra_addresses.clear()


def _target_port(service_port: Obj, pod: Obj) -> int | None:
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in pod["spec"].get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


class ServiceProxies:
    """Forwarders for every Service port (cluster IP, and a load-balancer IP for LoadBalancer Services)."""

    def __init__(self, store: Store, network: Network, lb_addresses: dict[str, str] | None = None) -> None:
        self.store = store
        self.network = network
        # "namespace/name" -> the load-balancer address users connect to (fixed so values can name it).
        self.lb_addresses = dict(lb_addresses or {})
        self._lb_pool = (str(a) for a in itertools.islice(LB_CIDR.hosts(), 100, None))
        self._servers: dict[tuple[str, int], asyncio.AbstractServer] = {}
        self._rr = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rehearsal-services", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="rehearsal-services-watch", daemon=True)
        self._stop = threading.Event()
        self.ingress = IngressController(self)

    def start(self) -> None:
        self._thread.start()
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._watcher.join(5)

        async def close_all() -> None:
            for server in self._servers.values():
                server.close()
            self._servers.clear()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def lb_address(self, namespace: str, name: str) -> str | None:
        return self.lb_addresses.get(f"{namespace}/{name}")

    def _watch(self) -> None:
        seen = 0
        while not self._stop.is_set():
            seen = self.store.wait_for_change(seen, 0.5)
            services, _, _ = self.store.list("services", None)
            for svc in services:
                for address, port in self._listen_points(svc):
                    if (address, port) not in self._servers:
                        self.network.add_address(address)
                        future = asyncio.run_coroutine_threadsafe(self._serve(svc, address, port), self._loop)
                        try:
                            self._servers[(address, port)] = future.result(5)
                        except OSError as exc:
                            log.warning("service %s/%s: cannot listen on %s:%s: %s", svc["metadata"]["namespace"],
                                        svc["metadata"]["name"], address, port, exc)
            ingresses, _, _ = self.store.list("ingresses", None)
            for ingress in ingresses:
                key = (f"ingress:{ingress['metadata']['namespace']}/{ingress['metadata']['name']}", 80)
                if key not in self._servers:
                    future = asyncio.run_coroutine_threadsafe(self.ingress.serve(ingress), self._loop)
                    self._servers[key] = future.result(5)

    def _listen_points(self, svc: Obj) -> Iterable[tuple[str, int]]:
        spec = svc.get("spec") or {}
        cluster_ip = spec.get("clusterIP")
        key = f"{svc['metadata']['namespace']}/{svc['metadata']['name']}"
        for port in spec.get("ports") or []:
            if cluster_ip and cluster_ip != "None":
                yield cluster_ip, int(port["port"])
            if spec.get("type") == "LoadBalancer":
                if key not in self.lb_addresses:
                    self.lb_addresses[key] = next(self._lb_pool)
                yield self.lb_addresses[key], int(port["port"])

    def endpoints(self, namespace: str, name: str, port: int) -> list[tuple[str, int]]:
        """Ready pods behind a Service port that are not terminating, as (pod IP, target port)."""
        svc = self.store.find("services", namespace, name)
        if svc is None:
            return []
        spec = svc.get("spec") or {}
        selector = spec.get("selector") or {}
        service_port = next((p for p in spec.get("ports") or [] if int(p["port"]) == port), None)
        if not selector or service_port is None:
            return []
        pods, _, _ = self.store.list("pods", namespace, ",".join(f"{k}={v}" for k, v in selector.items()))
        result = []
        for pod in pods:
            target = _target_port(service_port, pod)
            address = (pod.get("status") or {}).get("podIP")
            # A terminating Pod is no endpoint (EndpointSlice ready=false), Ready or not: no new connections.
            terminating = bool(pod["metadata"].get("deletionTimestamp"))
            if is_ready(pod) and not terminating and target and address:
                result.append((address, target))
        return result

    async def _serve(self, svc: Obj, address: str, port: int) -> asyncio.AbstractServer:
        namespace, name = svc["metadata"]["namespace"], svc["metadata"]["name"]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            targets = self.endpoints(namespace, name, port)
            if not targets:
                writer.close()  # no Ready endpoint: the connection is refused, as by kube-proxy's REJECT
                return
            host, target = targets[next(self._rr) % len(targets)]
            try:
                up_reader, up_writer = await asyncio.open_connection(host, target)
            except OSError:
                writer.close()
                return
            with contextlib.suppress(asyncio.CancelledError):  # shutdown: the connection just ends
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return await asyncio.start_server(handle, address, port, reuse_address=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _route(ingress: Obj, host: str, path: str) -> tuple[str, int | str] | None:
    """The backend (service, port) an Ingress sends a request to, or None (404)."""
    best: tuple[int, tuple[str, int | str]] | None = None
    for rule in (ingress.get("spec") or {}).get("rules") or []:
        if rule.get("host") and rule["host"] != host.split(":")[0]:
            continue
        for candidate in (rule.get("http") or {}).get("paths") or []:
            prefix, kind = candidate.get("path", "/"), candidate.get("pathType", "Prefix")
            exact = kind == "Exact" and path == prefix
            prefixed = kind != "Exact" and (path == prefix or path.startswith(prefix.rstrip("/") + "/"))
            if exact or prefixed:
                backend = candidate["backend"]["service"]
                port = backend["port"].get("number") or backend["port"].get("name")
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), (backend["name"], port))
    return best[1] if best else None


class IngressController:
    """An HTTP ingress controller: each Ingress gets an address of its own on port 80; every request is
    routed by host and path to a Ready endpoint of its backend Service, and what no rule names is a 404."""

    def __init__(self, proxies: ServiceProxies) -> None:
        self.proxies = proxies
        self.addresses: dict[str, str] = {}

    async def serve(self, ingress: Obj) -> asyncio.AbstractServer:
        namespace, name = ingress["metadata"]["namespace"], ingress["metadata"]["name"]
        key = f"ingress:{namespace}/{name}"
        address = self.proxies.lb_addresses.setdefault(key, next(self.proxies._lb_pool))
        self.proxies.network.add_address(address)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                writer.close()
                return
            lines = head.decode("latin-1").split("\r\n")
            _method, target, _ = ([*lines[0].split(" "), "", "", ""])[:3]
            host = next((ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith("host:")), "")
            current = self.proxies.store.find("ingresses", namespace, name) or ingress
            backend = _route(current, host, target.split("?")[0])
            targets = []
            if backend is not None:
                service = self.proxies.store.find("services", namespace, backend[0])
                port = backend[1]
                if service is not None and not isinstance(port, int):
                    port = next((int(p["port"]) for p in service["spec"].get("ports") or []
                                 if p.get("name") == port), 0)
                targets = self.proxies.endpoints(namespace, backend[0], int(port))
            if not targets:
                body = b"404 page not found\n" if backend is None else b"503 no endpoints\n"
                status = b"404 Not Found" if backend is None else b"503 Service Unavailable"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() +
                             b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
                writer.close()
                return
            # One request per connection: every request is routed, none rides a kept-alive backend link.
            kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith(("connection:", "keep-alive:"))]
            client = writer.get_extra_info("peername")[0]
            forwarded = "\r\n".join([lines[0], *kept, "Connection: close", f"X-Forwarded-For: {client}", "", ""])
            host_ip, target_port = targets[next(self.proxies._rr) % len(targets)]
            try:
                up_reader, up_writer = await asyncio.open_connection(host_ip, target_port)
            except OSError:
                writer.close()
                return
            up_writer.write(forwarded.encode("latin-1"))
            with contextlib.suppress(asyncio.CancelledError):  # shutdown: the connection just ends
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return await asyncio.start_server(handle, address, 80, reuse_address=True)
