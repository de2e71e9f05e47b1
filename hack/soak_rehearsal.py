"""The soak's platform on Kubernetes: the chart installed by helm on the rehearsal's one-node cluster
(rehearsal/: a real HTTPS API server, a kubelet running Pods as processes in namespaces).

Users meet it as on a real cluster. With `--access direct` (the default): the orz CLI against the ingress's
load-balancer address, OpenSSH to the gateway's, the browser door on the gateway's web port. With
`--access api`, as on kind and most clusters: only through port-forwards by the cluster's API server
(rehearsal.kube.PodForwarder, the rehearsal's own `--access api`), each new connection to a Ready Pod of
the component, and the chart told those local addresses are the public ones.
Either way the operator works through the cluster's API (`kubectl exec` for `orz admin` and psql, Pod
deletes) plus what only this machine can do, as the rehearsal's own steps do: kill -9 of a container's
process (the kubelet restarts it) and reading the container processes' /proc and Pod IPs for memory, fds
and metrics; so the faults are the same in both modes and only the users' path differs.
Needs root and the machine's rehearsal lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from soak_faults import REHEARSAL_FAULTS
from soak_platform import CLOUD_YAML, ROOT, http_get, rss_kib, wait_for

from api.instances.providers.kubernetes.names import SESSION_LABEL, label_value
from rehearsal import evidence, steps
from rehearsal.kube import KubeAccess, container_port

HELM = ROOT / ".cache" / "bin" / "helm"
# The lock `python -m rehearsal` takes besides the cluster's own (rehearsal/__main__.py).
RUN_LOCK = Path("/run/lock/orz-rehearsal.lock")
# The cluster has no redis image: the fixture's session has no service (users -L to a server they start).
CLOUD_YAML_NO_SERVICES = CLOUD_YAML.split("services:", 1)[0]
ACCESS_MODES = ("direct", "api")
PSQL = ["psql", "-h", "/var/run/postgresql", "-U", "orz", "-d", "orz", "-At", "-v", "ON_ERROR_STOP=1", "-c"]


def git_script(cloud_yaml: str) -> str:
    """The git server Pod's script: the soak's fixture (its .orz/cloud.yaml) served by git daemon."""
    return steps.GIT_SCRIPT.replace(
        "printf 'version: \"1.0\"\\nsetup:\\n  init: echo init-ran > .init-marker\\n' > .orz/cloud.yaml\n",
        f"cat > .orz/cloud.yaml <<'CLOUD_YAML'\n{cloud_yaml}CLOUD_YAML\n")


def soak_values(idle_timeout_s: int) -> dict[str, Any]:
    """The soak's clock on the chart, as the embedded soak sets it: sessions go idle, get reaped and
    are noticed within a short run; a quota that lets every simulated user have sessions."""
    return {"config": {
        "planIdleTimeoutSeconds": idle_timeout_s,
        "quotas": {"team": 500},
        "extraEnv": {"ORZ_REPO_ALLOW_HOSTS": steps.GIT_HOST, "ORZ_REAP_INTERVAL_S": "3",
                     "ORZ_HEARTBEAT_INTERVAL_S": "3", "ORZ_SCHEDULER_LEASE_S": "4",
                     "ORZ_HEARTBEAT_FAIL_S": "60", "ORZ_WORK_SCAN_S": "5"},
    }}


def user_edge(access: KubeAccess, mode: str, values: Path) -> steps.Edge:
    """How the soak's users reach the chart: its load balancers (direct), or port-forwards to Ready Pods
    through the API server (api), whose local addresses the chart's values then name as the public ones."""
    if mode == "api":
        return steps.forwarded_edge(access, values)
    if mode == "direct":
        return steps.load_balancer_edge(values)
    raise ValueError(f"unknown access mode {mode!r} (known: {', '.join(ACCESS_MODES)})")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError, ValueError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


@dataclass
class PodSlot:
    """One replica of a component (the n-th Ready Pod by name): its container's main process, the one
    using the most memory in the container (PID 1 may be an init), and each time that process changed."""

    platform: RehearsalPlatform
    component: str
    index: int = 0
    starts: list[float] = field(default_factory=list)
    _seen: tuple[str, int] | None = None

    def pod(self) -> dict[str, Any] | None:
        # Every Pod, Ready or not: a replica restarting must not hand its slot to the other one.
        pods = sorted(self.platform.component_pods(self.component, ready=False), key=lambda p: p["metadata"]["name"])
        return pods[self.index] if len(pods) > self.index else None

    @property
    def pid(self) -> int | None:
        pod = self.pod()
        if pod is None or self.platform.cluster is None:
            return None
        kubelet = self.platform.cluster.kubelet
        worker = kubelet.worker(pod["metadata"]["namespace"], pod["metadata"]["name"]) if kubelet else None
        running = worker.containers.get(self.component) if worker else None
        init = running.init_pid() if running else None
        if init is None:
            return None
        pid = max(process_tree(init), key=lambda p: rss_kib(p) or 0)
        seen = (pod["metadata"]["uid"], pid)
        if seen != self._seen:
            self._seen = seen
            self.starts.append(time.time())
        return pid


@dataclass
class RehearsalPlatform:
    base: Path
    idle_timeout_s: int = 20
    helm: Path = HELM
    values: Path = steps.VALUES
    access_mode: str = "direct"  # how users reach it: "direct" (load balancers) or "api" (port-forwards)
    database: str = "postgres (the chart's)"
    data: Path = field(init=False)
    env: dict[str, str] = field(init=False, default_factory=dict)
    services: dict[str, PodSlot] = field(init=False, default_factory=dict)
    admin_token: str = field(init=False, default="")
    fixture_url: str = field(init=False, default="")
    fault_kinds: tuple[str, ...] = REHEARSAL_FAULTS
    session_service: bool = False
    cluster: Any = field(init=False, default=None)  # rehearsal.cluster.RehearsalCluster
    access: Any = field(init=False, default=None)  # rehearsal.cluster.RehearsalAccess
    edge: steps.Edge | None = field(init=False, default=None)  # the users' way in (user_edge)
    artifacts: Path | None = field(init=False, default=None)  # the Pods' logs and history, saved at stop
    _lock: IO[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.data = self.base / "data"
        (self.data / "logs").mkdir(parents=True, exist_ok=True)
        self.services = {"api-0": PodSlot(self, "api", 0), "api-1": PodSlot(self, "api", 1),
                         "gateway-0": PodSlot(self, "gateway", 0), "gateway-1": PodSlot(self, "gateway", 1),
                         "scheduler": PodSlot(self, "scheduler"), "postgresql": PodSlot(self, "postgresql")}

    # -- where users and the operator reach it ----------------------------------------------------

    @property
    def api_url(self) -> str:
        return self.edge.api_url if self.edge else f"http://{steps.API_LB}"

    @property
    def web_url(self) -> str:
        return f"http://{self.edge.web_host}" if self.edge else f"http://{steps.GATEWAY_LB}:443"

    def component_pods(self, component: str, ready: bool = True) -> list[dict[str, Any]]:
        if self.access is None:
            return []
        return (self.access.ready_pods if ready else self.access.pods)(steps.NS, steps.SELECTOR + component)

    def _pod_of(self, name: str) -> dict[str, Any] | None:
        """The Pod behind a service name: a slot (api-1) or any Ready replica of a component (gateway)."""
        if name in self.services:
            return self.services[name].pod()
        pods = self.component_pods(name)
        return pods[0] if pods else None

    def metrics_url(self, service: str) -> str:
        pod = self._pod_of(service)
        port = container_port(pod, "metrics") if pod else None
        if pod is None or port is None or not pod.get("status", {}).get("podIP"):
            return ""  # nothing to ask (PostgreSQL, or no Ready replica): http_get answers status 0
        return f"http://{pod['status']['podIP']}:{port}/metrics"

    def orz(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=env or self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def admin(self, *argv: str) -> str:
        """`kubectl exec deploy/api -- orz admin ...`; its output."""
        pods = self.component_pods("api")
        if not pods:
            raise RuntimeError("no Ready API Pod to run orz admin in")
        done = self.access.exec_in(pods[0], "api", ["orz", "admin", *argv])
        if done.returncode != 0:
            raise RuntimeError(f"orz admin {argv[0]}: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return done.stdout.decode(errors="replace")

    def psql(self, sql: str) -> str:
        """psql in the chart's PostgreSQL Pod (by exec), as its operator would."""
        pods = self.component_pods("postgresql")
        if not pods:
            raise RuntimeError("no Ready PostgreSQL Pod")
        done = self.access.exec_in(pods[0], "postgresql", [*PSQL, sql])
        if done.returncode != 0:
            raise RuntimeError(f"psql: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return done.stdout.decode(errors="replace")

    # -- set up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        from rehearsal.cluster import RehearsalAccess, RehearsalCluster

        if not self.helm.is_file():
            raise RuntimeError(f"no helm at {self.helm} (make helm fetches it)")
        # One rehearsal per machine: the same two locks `python -m rehearsal` holds.
        self._lock = RUN_LOCK.open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"soak: another rehearsal holds {RUN_LOCK}; waiting for it to finish", flush=True)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        work = self.base / "rehearsal"
        self.cluster = RehearsalCluster(work / "cluster", self.helm, steps.LB_ADDRESSES)
        self.cluster.__enter__()
        self.access = RehearsalAccess(self.cluster, work, remote=False)
        values = self.base / "soak-values.yaml"
        values.write_text(yaml.safe_dump(soak_values(self.idle_timeout_s)))
        # The forwarders listen before the install: their addresses are in the values as the public ones.
        edge = self.edge = user_edge(self.access, self.access_mode, self.values)
        edge.values += ["-f", str(values)]
        ctx = steps.Context(cluster=self.access, edge=edge, workdir=work, home=self.base / "admin-home")
        ctx.home.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        steps.helm_install(ctx)
        steps.control_plane_ready(ctx)
        self.access.create(steps.NS, steps.git_server_objects(edge.runner_image, git_script(CLOUD_YAML_NO_SERVICES)))
        ctx.wait("the git server Ready",
                 lambda: bool(self.access.ready_pods(steps.NS, f"app.kubernetes.io/name={steps.GIT_SERVICE}")),
                 120, ctx.pod_summary)
        self.fixture_url = f"git://{steps.GIT_HOST}/fixture.git"
        print(f"soak: chart installed and Ready on the rehearsal in {time.time() - t0:.0f} s; users reach it "
              f"{'by port-forward' if self.access_mode == 'api' else 'at its load balancers'}: API {self.api_url}, "
              f"web {self.web_url}", flush=True)
        self.env = self.user_env(ctx.home)
        self.admin("create-org", "soak", "--plan", "team")
        self.admin("create-user", "admin@soak.test", "--org", "soak", "--role", "admin")
        self.admin_token = self._token("admin@soak.test")
        for slot in self.services.values():
            _ = slot.pid  # each replica's first process: its start

    def _token(self, email: str) -> str:
        match = re.search(r"orz_[A-Za-z0-9_\-]+", self.admin("create-token", email))
        if not match:
            raise RuntimeError(f"orz admin create-token {email} printed no token")
        return match.group(0)

    def add_user(self, name: str) -> tuple[Path, str]:
        """A user of the soak org with their own HOME, CLI login and `ssh <id>.orz` config."""
        email = f"{name}@soak.test"
        self.admin("create-user", email, "--org", "soak")
        token = self._token(email)
        home = self.base / "homes" / name
        (home / ".config" / "orzbob").mkdir(parents=True, exist_ok=True)
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        token_file = home / ".config" / "orzbob" / "token.json"
        token_file.write_text(json.dumps({"api_url": self.api_url, "api_token": token}))
        token_file.chmod(0o600)
        wrote = self.orz("cloud", "ssh-config", "--write", env=self.user_env(home))
        if wrote.returncode != 0:
            raise RuntimeError(f"orz cloud ssh-config --write: {wrote.stderr.strip()}")
        return home, token

    def user_env(self, home: Path) -> dict[str, str]:
        return {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "LANG": "C.UTF-8",
                "PYTHONPATH": str(ROOT), "TERM": "xterm", "ORZBOB_API_URL": self.api_url}

    # -- faults -----------------------------------------------------------------------------------

    def restart(self, name: str) -> str:
        """gateway, api: kill -9 of one replica's container, back when the kubelet has it Ready again;
        scheduler: its Pod deleted, back when the Deployment's replacement is Ready."""
        pods = self.component_pods(name)
        if not pods:
            raise RuntimeError(f"no Ready {name} Pod")
        pod = pods[0]
        pod_name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        if name == "scheduler":
            self.access.delete_pod(steps.NS, pod_name)
            back = wait_for(lambda: any(p["metadata"]["uid"] != uid for p in self.component_pods(name)), 120, 0.5)
            return f"Pod {pod_name} deleted" + ("" if back else "; no Ready replacement within 120 s")
        before = _restarts(pod, name)
        self.access.kill_container(pod, name)

        def again() -> bool:
            now = [p for p in self.component_pods(name) if p["metadata"]["uid"] == uid]
            return bool(now) and _restarts(now[0], name) > before

        back = wait_for(again, 120, 0.5)
        return f"{pod_name}'s {name} container killed -9" + ("" if back else "; not Ready again within 120 s")

    def session_pod(self, sid: str) -> dict[str, Any] | None:
        pods = self.access.pods(steps.SESSIONS_NS, f"{SESSION_LABEL}={label_value(sid)}")
        return pods[0] if pods else None

    def kill_session(self, sid: str) -> str:
        """kill -9 of the session Pod's runner container (its Pod stays; the kubelet restarts it)."""
        pod = self.session_pod(sid)
        if pod is None:
            raise RuntimeError(f"no Pod for session {sid}")
        self.access.kill_container(pod, "runner")
        return f"{pod['metadata']['name']}'s runner killed -9"

    def terminate_db(self) -> str:
        """pg_terminate_backend of every client connection to the platform's database (the API's and the
        scheduler's), by psql in the PostgreSQL Pod. They arrive through the Service's proxy, so their
        client address does not say which Pod holds them."""
        ended = self.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'orz' "
                          "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").strip()
        return f"{ended} connection(s) to the orz database terminated"

    def scheduler_leader(self) -> bool:
        return b"orz_scheduler_leader 1.0" in http_get(self.metrics_url("scheduler"))[1]

    # -- at the end -------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Session objects still in the sessions namespace once every session was killed."""
        left = []
        for plural in ("pods", "persistentvolumeclaims", "secrets", "configmaps"):
            for obj in self.access.objects(plural, steps.SESSIONS_NS):
                labels = obj["metadata"].get("labels") or {}
                if SESSION_LABEL in labels:
                    left.append(f"{plural[:-1]} {obj['metadata']['name']} (session {labels[SESSION_LABEL]})")
        return left

    def db_rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        for line in self.psql("SELECT state, count(*) FROM instances GROUP BY state").splitlines():
            if "|" in line:
                state, _, count = line.partition("|")
                rows[state.strip()] = int(count.strip())
        return rows

    def stop(self) -> None:
        """The whole cluster down: every process, namespace, address and mount it made; the locks freed."""
        if self.edge is not None:
            self.edge.close()
        if self.access is not None:
            with contextlib.suppress(Exception):
                self.access.close()
        if self.cluster is not None:
            # Before the cluster goes: its Pods' logs and history live only as long as it does.
            self.artifacts = evidence.save_quietly(self.cluster, f"soak-{self.access_mode}")
            self.cluster.close()
            self.cluster = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def drop_database(self) -> None:
        """The database lived in the cluster's PostgreSQL Pod: gone with the cluster."""


def _restarts(pod: dict[str, Any], container: str) -> int:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return int(status.get("restartCount", 0))
    return 0

