"""exec and port-forward through the rehearsal's API server, driven by the official client (rehearsal.kube).

The steps use these on every cluster (the rehearsal's and kind's), so they are checked here over HTTPS
with a kubeconfig, as the steps run them; the exec handler is a stand-in for the kubelet (it runs the
command on this machine), and the Pods' "containers" are TCP servers on 127.0.0.1.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rehearsal.apiserver import FakeApiServer
from rehearsal.kube import KubeAccess, PodForwarder
from rehearsal.store import Store
from tests.support import free_port

NS = "team"
TOKEN = "test-admin-token"


def run_here(namespace: str, pod: str, container: str, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Stands in for the kubelet's exec: the command runs on this machine."""
    return subprocess.run(argv, capture_output=True, timeout=30, check=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer(store=Store(require_namespaces=True), tls=True, tls_dir=tmp_path / "pki") as srv:
        srv.store.create("namespaces", "", {"metadata": {"name": NS}})
        srv.exec_handler = run_here
        yield srv


@pytest.fixture
def access(server: FakeApiServer, tmp_path: Path) -> Iterator[KubeAccess]:
    assert server.ca_file is not None
    ca = base64.b64encode(server.ca_file.read_bytes()).decode()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: '{server.url}', certificate-authority-data: {ca}}}}}]\n"
        f"users: [{{name: u, user: {{token: {TOKEN}}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n")
    kube = KubeAccess(kubeconfig, Path("/nonexistent/helm"), tmp_path)
    try:
        yield kube
    finally:
        kube.close()


def ready_pod(server: FakeApiServer, name: str, port: int, app: str = "echo") -> dict:
    server.store.create("pods", NS, {"metadata": {"name": name, "labels": {"app": app}}, "spec": {"containers": [
        {"name": "main", "image": "x", "ports": [{"name": "echo", "containerPort": port}]}]}})
    server.set_pod_phase(NS, name, "Running", "127.0.0.1",
                         conditions=[{"type": "Ready", "status": "True"}])
    return server.store.get("pods", NS, name)


class TaggedEcho:
    """A TCP server that answers every connection with its tag, then echoes what it gets."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall(self.tag)
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def exchange(address: tuple[str, int], payload: bytes, want: int) -> bytes:
    """Connect, send payload, read `want` bytes back (or what came before the server closed).

    No half-close: the official client's port-forward ends the whole stream at the local end of file,
    as clients of ssh and HTTP never notice (they do not half-close).
    """
    with socket.create_connection(address, timeout=20) as conn:
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        chunks, got = [], 0
        while got < want and (data := conn.recv(65536)):
            chunks.append(data)
            got += len(data)
        sender.join()
    return b"".join(chunks)


def test_exec_returns_output_and_exit_status(server: FakeApiServer, access: KubeAccess) -> None:
    pod = ready_pod(server, "p1", 1)
    done = access.exec_in(pod, "main", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    # Output larger than one short frame, and success.
    big = access.exec_in(pod, "main", ["head", "-c", "300000", "/dev/zero"])
    assert (big.returncode, len(big.stdout)) == (0, 300000)


def test_exec_in_a_missing_container_fails_like_kubectl(server: FakeApiServer, access: KubeAccess) -> None:
    pod = ready_pod(server, "p1", 1)
    with pytest.raises(Exception, match=r"400|containers"):
        access.exec_in(pod, "sidecar", ["true"])


def test_a_forwarder_carries_bytes_both_ways_and_spreads_connections(server: FakeApiServer,
                                                                     access: KubeAccess) -> None:
    a, b = TaggedEcho(b"A"), TaggedEcho(b"B")
    try:
        ready_pod(server, "pod-a", a.port)
        ready_pod(server, "pod-b", b.port)
        forwarder = PodForwarder(access, NS, "app=echo", "echo")
        payload = os.urandom(1024 * 1024)
        tags = set()
        for _ in range(2):
            reply = exchange(forwarder.address, payload, 1 + len(payload))
            tags.add(reply[:1])
            assert hashlib.sha256(reply[1:]).digest() == hashlib.sha256(payload).digest()
        assert tags == {b"A", b"B"}, "two connections should reach the two Ready pods in turn"
        # A Pod that is no longer Ready gets no new connections.
        server.set_pod_phase(NS, "pod-a", "Running", "127.0.0.1", conditions=[{"type": "Ready", "status": "False"}])
        assert {exchange(forwarder.address, b"x", 2)[:1] for _ in range(3)} == {b"B"}
        forwarder.close()
    finally:
        a.close()
        b.close()


def test_a_forward_to_a_closed_port_ends_the_connection(server: FakeApiServer, access: KubeAccess) -> None:
    closed = free_port()
    ready_pod(server, "pod-a", closed)
    forwarder = PodForwarder(access, NS, "app=echo", "echo")
    try:
        assert exchange(forwarder.address, b"hello", 5) == b""
    finally:
        forwarder.close()


def test_creating_objects_again_keeps_them_and_other_errors_still_fail(server: FakeApiServer,
                                                                      access: KubeAccess) -> None:
    """The steps' git server on a kept cluster: a second create finds it there; a bad object still fails."""
    from kubernetes.utils import FailToCreateError

    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fixture"}, "data": {"a": "1"}}
    access.create(NS, [config_map])
    access.create(NS, [{**config_map, "data": {"a": "2"}}])
    assert server.store.get("configmaps", NS, "fixture")["data"] == {"a": "1"}
    with pytest.raises(FailToCreateError):
        access.create(NS, [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_A_Name"}}])


def test_finished_forwards_leave_no_socket_open(server: FakeApiServer, access: KubeAccess) -> None:
    """Every connection through a forwarder ends with nothing left open in this process, whichever end
    hung up first, without waiting for the garbage collector (a soak forwards thousands)."""
    class HangsUp(TaggedEcho):
        def _echo(self, conn: socket.socket) -> None:
            with conn:
                conn.sendall(self.tag)

    first, echo = HangsUp(b"H"), TaggedEcho(b"E")
    ready_pod(server, "hangs-up", first.port, app="hangs-up")
    ready_pod(server, "echo", echo.port)
    by_pod, by_us = PodForwarder(access, NS, "app=hangs-up", "echo"), PodForwarder(access, NS, "app=echo", "echo")

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.disable()
    try:
        exchange(by_pod.address, b"", 1)  # the first of each makes the client's pools: not counted
        exchange(by_us.address, b"x", 2)
        before = open_fds()
        for _ in range(10):
            assert exchange(by_pod.address, b"", 1) == b"H"
            assert exchange(by_us.address, b"x", 2) == b"Ex"
        deadline = time.monotonic() + 30
        while open_fds() > before and time.monotonic() < deadline:
            time.sleep(0.2)  # the last streams' close handshakes
        assert open_fds() <= before
    finally:
        gc.enable()
        by_pod.close()
        by_us.close()
        first.close()
        echo.close()
