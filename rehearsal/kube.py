"""A cluster seen only through its Kubernetes API, with the official client: what the steps do on kind.

``KubeAccess(kubeconfig, helm)`` lists Pods, runs ``exec`` and ``port-forward`` (WebSocket streams),
reads logs, deletes Pods and creates objects, all through the API server named in the kubeconfig. The
rehearsal's own cluster serves the same API (rehearsal.apiserver and rehearsal.streams), so the steps
run the same way against it (``--access api``) and against a real cluster (hack/e2e-kind.sh).

``PodForwarder`` is how users reach the platform from this machine when nothing else routes to the
cluster: a local listener whose every connection is port-forwarded to a Ready Pod of a component, picked
afresh (round robin) per connection, so a replaced Pod is simply not picked again.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward, stream

log = logging.getLogger(__name__)
Obj = dict[str, Any]

# The plurals the steps list, by the API group client that lists them.
_CORE_LISTS = {"pods": "list_namespaced_pod", "persistentvolumeclaims": "list_namespaced_persistent_volume_claim",
               "secrets": "list_namespaced_secret", "configmaps": "list_namespaced_config_map",
               "services": "list_namespaced_service"}


def is_ready(pod: Obj) -> bool:
    """The Pod's Ready condition is True (what a Service's endpoints and `kubectl wait` go by)."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class KubeAccess:
    """The steps' view of a cluster: helm, Pods, exec, logs, deletes, creates (see rehearsal.steps)."""

    def __init__(self, kubeconfig: Path, helm: Path, workdir: Path) -> None:
        self.kubeconfig = kubeconfig
        self.helm_binary = helm
        self.workdir = workdir
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.denials: list[str] = []  # RBAC denials seen by the API server, where it can say (the rehearsal's)
        self.reports_denials = False
        self._forwarders: list[PodForwarder] = []

    def close(self) -> None:
        self.close_forwarders()
        self.api_client.close()

    def _dict(self, obj: Any) -> Obj:
        return self.api_client.sanitize_for_serialization(obj)

    # ----------------------------------------------------------------------------------- helm

    def helm(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        cache = self.workdir / "helm"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(cache),
               "HELM_CONFIG_HOME": str(cache), "HELM_DATA_HOME": str(cache)}
        return subprocess.run([str(self.helm_binary), *args], capture_output=True, text=True, env=env,
                              timeout=timeout_s, check=False)

    # ----------------------------------------------------------------------------------- reads

    def pods(self, namespace: str, selector: str = "") -> list[Obj]:
        try:
            listed = self.core.list_namespaced_pod(namespace, label_selector=selector or None)
        except ApiException as exc:
            if exc.status == 404:
                return []
            raise
        return [p for p in (self._dict(i) for i in listed.items) if not p["metadata"].get("deletionTimestamp")]

    def ready_pods(self, namespace: str, selector: str = "") -> list[Obj]:
        return [p for p in self.pods(namespace, selector) if is_ready(p)]

    def objects(self, plural: str, namespace: str) -> list[Obj]:
        listed = getattr(self.core, _CORE_LISTS[plural])(namespace)
        return [self._dict(i) for i in listed.items]

    def log(self, pod: Obj, container: str) -> str:
        try:
            return str(self.core.read_namespaced_pod_log(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                                         container=container, limit_bytes=64 * 1024))
        except ApiException:
            return ""

    # ---------------------------------------------------------------------------------- writes

    def create(self, namespace: str, objects: list[Obj]) -> None:
        """Create each object; one that already exists is left as it is (a rerun on a kept cluster)."""
        for obj in objects:
            try:
                utils.create_from_dict(self.api_client, obj, namespace=namespace)
            except utils.FailToCreateError as failed:
                if any(exc.status != 409 for exc in failed.api_exceptions):
                    raise

    def delete_pod(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(name, namespace)

    def restart_deployment(self, namespace: str, name: str) -> None:
        """`kubectl rollout restart`: a new annotation on the Pod template, so every Pod is replaced by a
        rolling update as the Deployment's strategy allows."""
        stamp = {"kubectl.kubernetes.io/restartedAt": datetime.datetime.now(datetime.UTC).isoformat()}
        client.AppsV1Api(self.api_client).patch_namespaced_deployment(
            name, namespace, {"spec": {"template": {"metadata": {"annotations": stamp}}}})

    def kill_container(self, pod: Obj, container: str) -> None:
        """The nearest a cluster's API comes to kill -9 of a container: delete its Pod with no grace."""
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                            grace_period_seconds=0)

    # --------------------------------------------------------------------------------- streams

    def exec_in(self, pod: Obj, container: str, argv: list[str], timeout_s: float = 60
                ) -> subprocess.CompletedProcess[bytes]:
        """`kubectl exec`: argv in the container, its output and exit status."""
        ws = stream(self._stream_core().connect_get_namespaced_pod_exec, pod["metadata"]["name"],
                    pod["metadata"]["namespace"], container=container, command=argv, stdin=False, stdout=True,
                    stderr=True, tty=False, _preload_content=False, binary=True)
        out, err = b"", b""
        try:
            ws.run_forever(timeout=timeout_s)
            out, err = ws.read_stdout() or b"", ws.read_stderr() or b""
            code = ws.returncode if not ws.is_open() else 124
        finally:
            ws.close()
            # websocket-client skips closing its socket when the server's close frame came first.
            if ws.sock is not None:
                ws.sock.shutdown()
        return subprocess.CompletedProcess(argv, code, out, err)

    def _stream_core(self) -> client.CoreV1Api:
        """A CoreV1Api on an ApiClient of its own, for one exec or port-forward: kubernetes.stream swaps its
        client's call_api while it connects, which on the shared client would send other threads' calls
        (a Pod list, another forwarder's connect) down the WebSocket path, or leave the swap in place."""
        return client.CoreV1Api(client.ApiClient(configuration=self.api_client.configuration))

    def pod_endpoint(self, pod: Obj, port_name: str) -> tuple[str, int]:
        """Where this machine reaches one Pod's named port: a forwarder of its own to that Pod."""
        name = pod["metadata"]["name"]
        forwarder = PodForwarder(self, pod["metadata"]["namespace"], "", port_name, pod_name=name)
        self._forwarders.append(forwarder)
        return forwarder.address

    def close_forwarders(self) -> None:
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders.clear()

    def open_port(self, pod: Obj, port: int) -> ForwardedPort:
        """A socket-like object connected to the Pod's port through the API server."""
        forward = portforward(self._stream_core().connect_get_namespaced_pod_portforward, pod["metadata"]["name"],
                              pod["metadata"]["namespace"], ports=str(port))
        return ForwardedPort(forward, port)


class ForwardedPort:
    """This machine's end of one port-forward stream. Closing it also closes the WebSocket under it: the
    official client leaves that open when the server ended the stream first, until the garbage collector
    finds it, which holds a socket per finished connection meanwhile (thousands in a soak)."""

    def __init__(self, forward: Any, port: int) -> None:
        self._forward = forward
        self._socket = forward.socket(port)
        # The client's thread carrying this stream (kubernetes.stream.ws_client.PortForward._proxy): the
        # WebSocket is only ours to close once it is done. Not running any more: done already (a Pod that
        # hung up at once). A client or Python whose thread cannot be told: the collector closes it, as before.
        carry = getattr(forward, "_proxy", None)
        self._knows_carrier = carry is not None and _THREADS_KEEP_TARGET
        self._carrier = next((t for t in threading.enumerate() if getattr(t, "_target", None) == carry), None) \
            if self._knows_carrier else None

    def recv(self, size: int) -> bytes:
        return bytes(self._socket.recv(size))

    def sendall(self, data: bytes) -> None:
        self._socket.sendall(data)

    def shutdown(self, how: int) -> None:
        self._socket.shutdown(how)

    def close(self) -> None:
        self._socket.close()
        if not self._knows_carrier:
            return
        if self._carrier is not None:
            self._carrier.join(timeout=10)  # it ends once both ends are closed (its close handshake: <= 3 s)
            if self._carrier.is_alive():
                return
        websocket = self._forward.websocket
        if websocket.sock is not None:
            websocket.shutdown()


# A running thread keeps its target as Thread._target (CPython); how ForwardedPort finds the client's carrier.
_THREADS_KEEP_TARGET = hasattr(threading.Thread(target=int), "_target")


def container_port(pod: Obj, port_name: str) -> int | None:
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == port_name:
                return int(port["containerPort"])
    return None


class PodForwarder:
    """127.0.0.1:<port> -> a Ready Pod's named port, through the API server's port-forward."""

    def __init__(self, access: KubeAccess, namespace: str, selector: str, port_name: str, *,
                 pod_name: str = "", listen_port: int = 0) -> None:
        self.access = access
        self.namespace, self.selector, self.port_name, self.pod_name = namespace, selector, port_name, pod_name
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._turn = itertools.count()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"forward-{port_name}", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _pick(self) -> Obj | None:
        pods = [p for p in self.access.ready_pods(self.namespace, self.selector)
                if not self.pod_name or p["metadata"]["name"] == self.pod_name]
        if not pods:
            return None
        pods.sort(key=lambda p: p["metadata"]["name"])
        return pods[next(self._turn) % len(pods)]

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._carry, args=(local,), daemon=True).start()

    def _carry(self, local: socket.socket) -> None:
        with local:
            pod = self._pick()
            port = container_port(pod, self.port_name) if pod else None
            if pod is None or port is None:
                log.warning("forward %s: no Ready pod with port %s", self.selector or self.pod_name, self.port_name)
                return
            try:
                remote = self.access.open_port(pod, port)
            except (ApiException, OSError) as exc:
                log.warning("forward to %s:%s failed: %s", pod["metadata"]["name"], port, exc)
                return
            with contextlib.closing(remote):
                pump = threading.Thread(target=_pump, args=(remote, local), daemon=True)
                pump.start()
                _pump(local, remote)
                pump.join(30)


def _pump(source: Any, sink: Any) -> None:
    """Copy bytes until end of file, then pass the end of file on."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
