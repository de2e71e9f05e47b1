"""One machine playing a one-node cluster: API server (HTTPS, RBAC), controllers, kubelet, Services.

``with RehearsalCluster(workdir) as cluster:`` brings it up and writes ``cluster.kubeconfig`` for an
administrator; ``close`` stops every process and removes every namespace, address and mount it made.
The steps drive it through its API (``RehearsalAccess``, the same client code as on a real cluster),
plus two things only this machine can do: kill -9 a container's process, and route to Pod IPs.
"""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from typing import IO

from rehearsal.apiserver import FakeApiServer
from rehearsal.controllers import Controllers, is_ready
from rehearsal.kube import KubeAccess, container_port
from rehearsal.kubelet import Cluster, Kubelet, PodWorker, ServiceAccountTokens
from rehearsal.network import GATEWAY_IP, Network, ServiceProxies
from rehearsal.policy import Enforcer
from rehearsal.rbac import Authorizer
from rehearsal.store import Obj, Store

ROOT = Path(__file__).resolve().parents[1]
API_PORT = 6443
MACHINE_LOCK = Path("/run/orz-rehearsal.lock")


class RehearsalCluster:
    def __init__(self, workdir: Path, helm: Path, lb_addresses: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.helm_binary = helm
        self.admin_token = f"rehearsal-admin-{secrets.token_urlsafe(16)}"
        self.tokens = ServiceAccountTokens()
        self.store = Store(require_namespaces=True, pod_termination_s=None)
        self.network = Network()
        self.authorizer = Authorizer(self.store, self.tokens, self.admin_token)
        self.api: FakeApiServer | None = None
        self.lb_addresses = lb_addresses or {}
        self.kubelet: Kubelet | None = None
        self.controllers = Controllers(self.store)
        self.proxies: ServiceProxies | None = None
        self.policy: Enforcer | None = None
        self._machine_lock: IO[bytes] | None = None

    def _take_machine(self) -> None:
        """One rehearsal per machine: its bridge, addresses and Service CIDR are fixed, so a second one
        (another checkout's CI, a soak on the rehearsal) waits here instead of tearing down the first's network."""
        lock = MACHINE_LOCK.open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rehearsal: another rehearsal holds {MACHINE_LOCK}; waiting for it to finish", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        self._machine_lock = lock

    def _release_machine(self) -> None:
        if self._machine_lock is not None:
            self._machine_lock.close()  # closing the file drops its flock
            self._machine_lock = None

    def __enter__(self) -> RehearsalCluster:
        if os.geteuid() != 0:
            raise SystemExit("rehearsal: needs root (network and mount namespaces, a bridge, setuid to pod users)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._take_machine()
        self.network.up()
        self.api = FakeApiServer(host=GATEWAY_IP, port=API_PORT, tls=True, tls_dir=self.workdir / "pki",
                                 store=self.store, authorizer=self.authorizer, bookmark_every_s=30)
        self.api.__enter__()
        for ns in ("default", "kube-system"):
            self.store.create("namespaces", "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        assert self.api.ca_file is not None
        self.proxies = ServiceProxies(self.store, self.network, self.lb_addresses)
        pods = self.network.pods
        self.policy = Enforcer(self.store, lambda: {uid: p.namespace for uid, p in list(pods.items())},
                               self.proxies.endpoints, lambda: {uid: p.address for uid, p in list(pods.items())})
        cluster = Cluster(store=self.store, network=self.network, workdir=self.workdir, api_host=GATEWAY_IP,
                          api_port=API_PORT, ca_file=self.api.ca_file, tokens=self.tokens, logs=self.api.logs,
                          policy=self.policy)
        self.kubelet = Kubelet(cluster)
        self.api.exec_handler = self._exec
        self.controllers.start()
        self.policy.start()
        self.kubelet.start()
        self.proxies.start()
        self.kubeconfig = self.workdir / "kubeconfig"
        ca = base64.b64encode(self.api.ca_file.read_bytes()).decode()
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: rehearsal, cluster: {{server: 'https://{GATEWAY_IP}:{API_PORT}', "
            f"certificate-authority-data: {ca}}}}}]\n"
            f"users: [{{name: admin, user: {{token: '{self.admin_token}'}}}}]\n"
            "contexts: [{name: rehearsal, context: {cluster: rehearsal, user: admin}}]\n"
            "current-context: rehearsal\n")
        self.kubeconfig.chmod(0o600)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proxies is not None:
            self.proxies.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.policy is not None:
            self.policy.stop()
        self.controllers.stop()
        if self.api is not None:
            self.api.__exit__()
        self.network.close()
        self._release_machine()
        # Pod root filesystems were mounted in namespaces that died with their processes; only files remain.
        shutil.rmtree(self.workdir / "pods", ignore_errors=True)

    # ------------------------------------------------------------------------------------- helpers

    def pods(self, namespace: str, selector: str = "") -> list[Obj]:
        items, _, _ = self.store.list("pods", namespace, selector)
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def ready_pods(self, namespace: str, selector: str = "") -> list[Obj]:
        return [p for p in self.pods(namespace, selector) if is_ready(p)]

    def worker(self, pod: Obj) -> PodWorker:
        assert self.kubelet is not None
        worker = self.kubelet.worker(pod["metadata"]["namespace"], pod["metadata"]["name"])
        if worker is None:
            raise RuntimeError(f"pod {pod['metadata']['name']} is not running here")
        return worker

    def exec_in(self, pod: Obj, container: str, argv: list[str], timeout_s: float = 60
                ) -> subprocess.CompletedProcess[bytes]:
        """`kubectl exec`: run argv in the container's namespaces as its user, with its environment."""
        running = self.worker(pod).containers.get(container)
        if running is None:
            raise RuntimeError(f"container {container} of {pod['metadata']['name']} is not running")
        done = running.exec(argv, timeout_s)
        if done is None:
            raise RuntimeError(f"container {container} of {pod['metadata']['name']} has no process")
        return done

    def _exec(self, namespace: str, name: str, container: str, argv: list[str]
              ) -> subprocess.CompletedProcess[bytes]:
        """The API server's pods/exec: the kubelet runs it."""
        return self.exec_in(self.store.get("pods", namespace, name), container, argv)

    def kill_container(self, pod: Obj, container: str) -> None:
        """kill -9 of the container's main process (the kubelet restarts it, as a runtime would)."""
        running = self.worker(pod).containers.get(container)
        if running is not None:
            running.signal(signal.SIGKILL)

    def log(self, pod: Obj, container: str) -> str:
        path = self.workdir / "pods" / pod["metadata"]["uid"] / "logs" / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class RehearsalAccess(KubeAccess):
    """The rehearsal's cluster through its API, as an administrator with kubectl would see it.

    Unless ``remote``, two things go past the API as only this machine can: kill -9 reaches a
    container's own process (its Pod stays and restarts it), and Pod IPs are routed here (as on a node).
    ``remote`` gives up both, as with kind: users arrive by port-forward and a kill deletes the Pod.
    """

    def __init__(self, cluster: RehearsalCluster, workdir: Path, *, remote: bool) -> None:
        super().__init__(cluster.kubeconfig, cluster.helm_binary, workdir)
        self.rehearsal = cluster
        self.remote = remote
        self.denials = cluster.authorizer.denials
        self.reports_denials = True

    def kill_container(self, pod: Obj, container: str) -> None:
        if self.remote:
            super().kill_container(pod, container)
        else:
            self.rehearsal.kill_container(pod, container)

    def pod_endpoint(self, pod: Obj, port_name: str) -> tuple[str, int]:
        port = container_port(pod, port_name)
        if self.remote or port is None:
            return super().pod_endpoint(pod, port_name)
        return pod["status"]["podIP"], port
