"""What a platform engineer and a user do with the chart, as timed steps against a cluster.

Each step passes or fails on what a person would see: helm's exit status, Pods Ready, a session that
reaches `running`, the bytes `ssh` prints, a file that comes back from scp with the same checksum.
Later steps need earlier ones; once one fails, the steps that depend on it are reported as not run.

The steps see the cluster only through its Kubernetes API (rehearsal.kube.KubeAccess: helm, Pods,
exec, logs, port-forward), so the same steps run on three targets:
- ``direct``: the rehearsal's own cluster, users reaching its load-balancer addresses (``make rehearse``);
- ``api``: the rehearsal's cluster, users reaching it only through port-forwards, as on kind;
- a real cluster named by a kubeconfig (hack/e2e-kind.sh), users through port-forwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes.client.rest import ApiException

from rehearsal import evidence, images, versions
from rehearsal.kube import KubeAccess, PodForwarder

ROOT = Path(__file__).resolve().parents[1]
NS = "orz-system"
SESSIONS_NS = "orz-sessions"
RELEASE = "orz"
CHART = ROOT / "charts" / "orzbob-cloud"
VALUES = ROOT / "hack" / "rehearsal-values.yaml"
# Load-balancer addresses the values file names (users connect to these).
GATEWAY_LB = "10.97.0.10"
API_LB = "10.97.0.11"
LB_ADDRESSES = {f"{NS}/{RELEASE}-orzbob-cloud-gateway": GATEWAY_LB, f"ingress:{NS}/{RELEASE}-orzbob-cloud-api": API_LB}
SELECTOR = "app.kubernetes.io/instance=" + RELEASE + ",app.kubernetes.io/component="
# The git server the sessions clone from: a Pod and Service of the test's own (values allow its name).
GIT_SERVICE = "git-fixture"
GIT_HOST = f"{GIT_SERVICE}.{NS}.svc.cluster.local"


class StepFailed(Exception):
    """The step's check did not hold; the message says what was seen."""


class NotApplicable(Exception):
    """The step cannot be shown on this target (the message says why); neither a pass nor a failure."""


@dataclass
class Edge:
    """How users reach the platform on this target, and what the values tell them."""

    api_url: str
    ssh_host: str  # what the API's ssh line must name
    web_host: str  # host:port an attach URL must name
    values: list[str]  # helm's -f/--set arguments, the same for install and upgrade
    image_tag: str  # the chart's image.tag in those values (the release the rollback returns to)
    runner_image: str
    public_ingress: bool  # the chart's Ingress is the users' way in (the ingress step applies)
    forwarders: list[PodForwarder] = field(default_factory=list)

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()


def values_file_edge(values: Path) -> tuple[str, str]:
    """image.tag and runner.image of a values file."""
    data = yaml.safe_load(values.read_text()) or {}
    return str((data.get("image") or {}).get("tag", "")), str((data.get("runner") or {}).get("image", ""))


def load_balancer_edge(values: Path = VALUES) -> Edge:
    """The rehearsal's cluster as users meet it: the gateway's and the ingress's load-balancer addresses."""
    tag, runner = values_file_edge(values)
    return Edge(api_url=f"http://{API_LB}", ssh_host=GATEWAY_LB, web_host=f"{GATEWAY_LB}:443",
                values=["-f", str(values)], image_tag=tag, runner_image=runner, public_ingress=True)


def forwarded_edge(access: KubeAccess, values: Path) -> Edge:
    """Users on this machine through port-forwards to Ready Pods (what kind and most clusters allow)."""
    api = PodForwarder(access, NS, SELECTOR + "api", "http")
    ssh = PodForwarder(access, NS, SELECTOR + "gateway", "ssh")
    web = PodForwarder(access, NS, SELECTOR + "gateway", "web")
    tag, runner = values_file_edge(values)
    public = [f"config.publicApiUrl=http://127.0.0.1:{api.address[1]}", "config.publicSshHost=127.0.0.1",
              f"config.publicSshPort={ssh.address[1]}", f"config.publicWebUrl=ws://127.0.0.1:{web.address[1]}"]
    return Edge(api_url=f"http://127.0.0.1:{api.address[1]}", ssh_host="127.0.0.1",
                web_host=f"127.0.0.1:{web.address[1]}",
                values=["-f", str(values), *(arg for pair in public for arg in ("--set", pair))],
                image_tag=tag, runner_image=runner, public_ingress=False, forwarders=[api, ssh, web])


@dataclass
class Context:
    cluster: KubeAccess
    edge: Edge
    workdir: Path
    home: Path
    token: str = ""
    session: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------- user's tools

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"),
                "ORZBOB_API_URL": self.edge.api_url, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "LANG": "C.UTF-8"}

    def orz(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(Path(sys.executable).parent / "orz"), *args], env=self.env(), text=True,
                              capture_output=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise StepFailed(f"orz {' '.join(args)} exited {done.returncode}: {(done.stderr or done.stdout)[-600:]}")
        return done

    def ssh(self, *args: str, timeout_s: float = 90, check: bool = True, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Plain OpenSSH with the config `orz cloud ssh-config --write` made (-F: ssh ignores $HOME)."""
        argv = ["ssh", "-F", str(self.home / ".ssh" / "config"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                *args]
        done = subprocess.run(argv, env=self.env(), text=True, capture_output=True, timeout=timeout_s, check=False,
                              input=stdin)
        if check and done.returncode != 0:
            raise StepFailed(f"ssh {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-600:]}")
        return done

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=self.edge.api_url, timeout=30,
                          headers={"Authorization": f"Bearer {self.token}"}) as client:
            return client.request(method, path, **kwargs)

    def session_state(self, session: str | None = None) -> str:
        reply = self.api("GET", f"/v1/instances/{session or self.session}")
        return str(reply.json().get("status")) if reply.status_code == 200 else f"HTTP {reply.status_code}"

    def wait(self, what: str, check: Callable[[], bool], timeout_s: float, detail: Callable[[], str] = lambda: ""
             ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise StepFailed(f"{what}: not within {timeout_s:.0f} s {detail()}".rstrip())

    # ----------------------------------------------------------------------------- cluster views

    def component_pods(self, component: str, ready: bool = True) -> list[dict]:
        pods = self.cluster.ready_pods if ready else self.cluster.pods
        return pods(NS, SELECTOR + component)

    def pod_summary(self) -> str:
        lines = []
        for ns in (NS, SESSIONS_NS):
            for pod in self.cluster.pods(ns):
                statuses = pod.get("status", {}).get("containerStatuses") or []
                states = ", ".join(f"{s['name']}:{next(iter(s['state']))}"
                                   f"{'/ready' if s.get('ready') else ''} x{s.get('restartCount', 0)}"
                                   for s in statuses)
                lines.append(f"    {pod['metadata']['name']}: {pod.get('status', {}).get('phase')} [{states}]")
                for status in statuses:
                    if not status.get("ready"):
                        tail = self.cluster.log(pod, status["name"]).strip().splitlines()[-3:]
                        lines.extend(f"      | {line[:220]}" for line in tail)
        return "\n" + "\n".join(lines) if lines else ""


# ------------------------------------------------------------------------------------ the steps

def install_needs_ssh_host(ctx: Context) -> None:
    """Without config.publicSshHost users would be told to ssh to an address they cannot reach: refused."""
    done = ctx.cluster.helm("install", RELEASE, str(CHART), "-n", NS, "--create-namespace", "--dry-run=server",
                            *ctx.edge.values, "--set", "config.publicSshHost=", timeout_s=120)
    if done.returncode == 0 or "publicSshHost" not in done.stderr:
        raise StepFailed(f"helm accepted the chart without config.publicSshHost (exit {done.returncode}) "
                         f"{done.stderr.strip()[-300:]}")


def helm_install(ctx: Context) -> None:
    done = ctx.cluster.helm("install", RELEASE, str(CHART), "-n", NS, "--create-namespace", *ctx.edge.values,
                            "--wait", "--timeout", "240s", timeout_s=400)
    if done.returncode != 0:
        raise StepFailed(f"helm install --wait: {done.stderr.strip()[-800:]}{ctx.pod_summary()}")


def control_plane_ready(ctx: Context) -> None:
    want = {"api": 2, "gateway": 2, "scheduler": 1, "postgresql": 1}
    ctx.wait("every control-plane replica Ready",
             lambda: all(len(ctx.component_pods(c)) >= n for c, n in want.items()), 120,
             lambda: str({c: len(ctx.component_pods(c)) for c in want}) + ctx.pod_summary())


def bootstrap_user(ctx: Context) -> None:
    """`kubectl exec deploy/api -- orz admin ...`: an org, a user, an API token."""
    api_pod = ctx.component_pods("api")[0]
    for argv in (["orz", "admin", "create-org", "acme", "--plan", "pro"],
                 ["orz", "admin", "create-user", "dev@acme.test", "--org", "acme"]):
        done = ctx.cluster.exec_in(api_pod, "api", argv)
        if done.returncode != 0:
            raise StepFailed(f"{' '.join(argv)}: {done.stderr.decode()[-400:]}")
    done = ctx.cluster.exec_in(api_pod, "api", ["orz", "admin", "create-token", "dev@acme.test"])
    token = next((w for w in done.stdout.decode().split() if w.startswith("orz_")), "")
    if done.returncode != 0 or not token:
        raise StepFailed(f"create-token printed no token: {done.stderr.decode()[-400:]}")
    ctx.token = token
    ctx.orz("cloud", "login", "--token", token, "--api-url", ctx.edge.api_url)
    ctx.orz("cloud", "ssh-config", "--write")


def internal_routes_stay_inside(ctx: Context) -> None:
    """The public edge (the ingress) serves /v1 and never /internal; service tokens never cross it."""
    if not ctx.edge.public_ingress:
        raise NotApplicable("users reach the API by port-forward here; no ingress is the public edge")
    public = ctx.api("GET", "/v1/me")
    if public.status_code != 200:
        raise StepFailed(f"GET /v1/me through the ingress answered {public.status_code}")
    for method, path in (("POST", "/internal/v1/authorize"), ("GET", "/metrics")):
        answer = ctx.api(method, path, json={} if method == "POST" else None)
        if answer.status_code != 404:
            raise StepFailed(f"{path} through the public ingress answered {answer.status_code}, not 404")


GIT_SCRIPT = """set -e
mkdir -p /srv/work/.orz /srv/git
cd /srv/work
printf 'version: "1.0"\\nsetup:\\n  init: echo init-ran > .init-marker\\n' > .orz/cloud.yaml
echo 'rehearsal fixture' > README.md
git init -q -b main .
git add -A
git -c user.name=Rehearsal -c user.email=r@example.test commit -qm fixture
git clone -q --bare /srv/work /srv/git/fixture.git
exec git daemon --reuseaddr --export-all --base-path=/srv/git --port=9418 /srv/git
"""


def git_server_objects(image: str, script: str = GIT_SCRIPT) -> list[dict[str, Any]]:
    """A Pod serving a fixture repository (.orz/cloud.yaml with an init) by git daemon, and its Service;
    ``script`` makes the repository and serves it (the soak's has a cloud.yaml of its own)."""
    labels = {"app.kubernetes.io/name": GIT_SERVICE}
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
                  "runAsUser": 1000, "runAsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": GIT_SERVICE, "labels": labels},
           "spec": {"containers": [{
               "name": "git", "image": image, "command": ["sh", "-c", script],
               "env": [{"name": "HOME", "value": "/srv"}], "ports": [{"name": "git", "containerPort": 9418}],
               "readinessProbe": {"tcpSocket": {"port": 9418}, "periodSeconds": 1},
               "securityContext": restricted, "volumeMounts": [{"name": "srv", "mountPath": "/srv"}]}],
               "volumes": [{"name": "srv", "emptyDir": {}}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": GIT_SERVICE, "labels": labels},
               "spec": {"selector": labels, "ports": [{"name": "git", "port": 9418, "targetPort": "git"}]}}
    return [pod, service]


def make_repo(ctx: Context) -> None:
    """A git server in the cluster (as a team's forge would be), allowed by name in the values."""
    ctx.cluster.create(NS, git_server_objects(ctx.edge.runner_image))
    ctx.wait("the git server Ready", lambda: bool(ctx.cluster.ready_pods(NS, f"app.kubernetes.io/name={GIT_SERVICE}")),
             120, ctx.pod_summary)
    ctx.facts["repo"] = f"git://{GIT_HOST}/fixture.git"


def create_session(ctx: Context) -> None:
    ctx.orz("cloud", "secrets", "create", "rehearsal", "--data", "REHEARSAL_SECRET=s3cr3t-value")
    done = ctx.orz("cloud", "new", "--repo", ctx.facts["repo"], "--branch", "main", "--secrets", "rehearsal",
                   "--program", "bash", "--no-attach", "--no-wait")
    words = done.stdout.split()
    ctx.session = words[words.index("session") + 1] if "session" in words else ""
    if not ctx.session:
        raise StepFailed(f"orz cloud new printed no session id: {done.stdout[-300:]}")
    ctx.wait("the session running", lambda: ctx.session_state() == "running", 180,
             lambda: f"(status {ctx.session_state()}){ctx.pod_summary()}")


def ssh_each_gateway(ctx: Context) -> None:
    """Plain ssh through every gateway replica, with the certificate `orz` fetched for it."""
    gateways = ctx.component_pods("gateway")
    if len(gateways) < 2:
        raise StepFailed(f"{len(gateways)} gateway replicas Ready, 2 expected")
    # What ssh's `Match exec` runs: a fresh certificate for the session and its ssh_config block.
    ctx.orz("cloud", "_refresh-cert", f"{ctx.session}.orz")
    config = ctx.home / ".config" / "orzbob"
    block = (config / "hosts" / f"{ctx.session}.conf").read_text().split()
    certificate = block[block.index("CertificateFile") + 1]
    # The refresh pinned the host key the API vouches for (the chart's gateway-host-public-key): every
    # replica must prove itself with exactly that key, checked strictly (nothing trusted on first use).
    known = config / "known_hosts"
    pinned = sorted({tuple(line.split()[1:3]) for line in (known.read_text() if known.exists() else "").splitlines()
                     if line.strip()})
    if len(pinned) != 1:
        raise StepFailed(f"the CLI's known_hosts holds {len(pinned)} gateway host keys, the one the API names expected")
    replica_hosts = ctx.workdir / "replica_known_hosts"
    for pod in gateways:
        address, port = ctx.cluster.pod_endpoint(pod, "ssh")
        replica_hosts.write_text(f"[{address}]:{port} {' '.join(pinned[0])}\n")
        argv = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i",
                str(config / "id_ed25519"), "-o", f"CertificateFile={certificate}", "-o",
                f"UserKnownHostsFile={replica_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-p", str(port), f"{ctx.session}@{address}", "cat .init-marker; echo secret=$REHEARSAL_SECRET"]
        done = subprocess.run(argv, env=ctx.env(), text=True, capture_output=True, timeout=60, check=False)
        if "init-ran" not in done.stdout or "secret=s3cr3t-value" not in done.stdout:
            raise StepFailed(f"through gateway {address}: {done.stdout!r} {done.stderr.strip()[-300:]!r}")
    # And the way users are told to connect: the API's ssh line, through the load balancer.
    reply = ctx.api("GET", f"/v1/instances/{ctx.session}").json()
    if ctx.edge.ssh_host not in str(reply.get("ssh")):
        raise StepFailed(f"the API tells users {reply.get('ssh')!r}, not {ctx.edge.ssh_host}")
    # git works in the workspace (a volume whose root is root's, as on a cluster).
    done = ctx.ssh(f"{ctx.session}.orz", "git status --short --branch && echo via-lb", check=False)
    if "via-lb" not in done.stdout or "## main" not in done.stdout:
        raise StepFailed(f"git status in the workspace, through the load balancer: {done.stdout!r} "
                         f"{done.stderr.strip()[-300:]!r}")


# What a Pod's connect() gives, printed by a one-line program run in the Pod (kubectl exec).
_DIAL = ("import socket, sys\n"
         "try:\n"
         "    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()\n"
         "    print('open')\n"
         "except OSError as exc:\n"
         "    print('closed', exc.errno, exc.strerror)\n")


def _dial(ctx: Context, pod: dict, container: str, host: str, port: int) -> str:
    """'open' when a TCP connection from the Pod's container to host:port opens, else 'closed <why>'."""
    python = sys.executable if hasattr(ctx.cluster, "rehearsal") else "python3"
    done = ctx.cluster.exec_in(pod, container, [python, "-c", _DIAL, host, str(port)], timeout_s=30)
    return done.stdout.decode(errors="replace").strip() or f"no answer: {done.stderr.decode()[-200:]}"


@contextlib.contextmanager
def _metadata_stand_in(ctx: Context) -> Iterator[str | None]:
    """A listener at the cloud metadata address on the rehearsal's node (as a cloud's would answer there),
    so that a session's denied connection shows the policy at work and not a missing server; None on a
    cluster whose nodes the steps cannot touch."""
    if getattr(ctx.cluster, "remote", True) or not hasattr(ctx.cluster, "rehearsal"):
        yield None
        return
    from rehearsal.network import BRIDGE, ip

    address = "169.254.169.254"
    ip("addr", "add", f"{address}/32", "dev", BRIDGE, check=False)
    server = socket.create_server((address, 80))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield address
    finally:
        stop.set()
        thread.join(5)
        server.close()
        ip("addr", "del", f"{address}/32", "dev", BRIDGE, check=False)


def session_network_confined(ctx: Context) -> None:
    """The chart's and the API's NetworkPolicies, as enforced on the Pods' own traffic: from inside a real
    session Pod, the API's HTTP port opens, and the API's metrics port, PostgreSQL, another session's
    runner and the metadata address do not; the gateway still reaches the runner, and a control-plane Pod
    that is not a gateway does not. Each denied target is first shown open from a Pod allowed to reach it,
    so a refusal is the policy's and not a missing server's."""
    ctx.orz("cloud", "new", "--repo", ctx.facts["repo"], "--branch", "main", "--program", "bash",
            "--no-attach", "--no-wait")
    def runners() -> list[dict]:
        return [p for p in ctx.cluster.ready_pods(SESSIONS_NS, "app.kubernetes.io/component=runner")
                if p["metadata"].get("labels", {}).get("orz.cloud/session")]
    ctx.wait("a second session's runner Ready", lambda: len(runners()) >= 2, 180, ctx.pod_summary)
    mine = next(p for p in runners() if p["metadata"]["labels"]["orz.cloud/session"] == ctx.session)
    other = next(p for p in runners() if p["metadata"]["labels"]["orz.cloud/session"] != ctx.session)
    ctx.facts["other_session"] = other["metadata"]["labels"]["orz.cloud/session"]
    api, gateway = ctx.component_pods("api")[0], ctx.component_pods("gateway")[0]
    services = {s["metadata"]["name"]: s for s in ctx.cluster.objects("services", NS)}
    api_service = services[f"{RELEASE}-orzbob-cloud-api"]
    api_host = f"{RELEASE}-orzbob-cloud-api.{NS}.svc.cluster.local"
    api_port = int(api_service["spec"]["ports"][0]["port"])
    postgres = f"{RELEASE}-orzbob-cloud-postgresql.{NS}.svc.cluster.local"
    metrics = int(_env(api, "api", "ORZ_API_METRICS_PORT") or 0)
    runner_port = int(next(p["containerPort"] for c in mine["spec"]["containers"] for p in c.get("ports") or []
                           if p.get("name") == "ssh"))
    ip_of = {"api": api["status"]["podIP"], "other": other["status"]["podIP"], "mine": mine["status"]["podIP"]}
    with _metadata_stand_in(ctx) as metadata:
        # (what, from pod, container, host, port, expected)
        checks = [
            ("gateway -> this session's runner ssh", gateway, "gateway", ip_of["mine"], runner_port, True),
            ("gateway -> the other session's runner ssh", gateway, "gateway", ip_of["other"], runner_port, True),
            ("api -> postgresql", api, "api", postgres, 5432, True),
            ("api -> this session's runner ssh (only gateways may)", api, "api", ip_of["mine"], runner_port, False),
            ("session -> the API Service's HTTP port", mine, "runner", api_host, api_port, True),
            ("session -> postgresql", mine, "runner", postgres, 5432, False),
            ("session -> the API Pod's HTTP port directly", mine, "runner", ip_of["api"],
             int(_env(api, "api", "ORZ_API_PORT") or 8080), True),
            ("session -> the other session's runner ssh", mine, "runner", ip_of["other"], runner_port, False),
        ]
        if metrics:
            checks[3:3] = [("gateway -> the API's metrics port", gateway, "gateway", ip_of["api"], metrics, True)]
            checks.append(("session -> the API's metrics port", mine, "runner", ip_of["api"], metrics, False))
        if metadata:
            checks[3:3] = [("api -> the metadata address", api, "api", metadata, 80, True)]
            checks.append(("session -> the metadata address", mine, "runner", metadata, 80, False))
        wrong = []
        for what, pod, container, host, port, expected in checks:
            seen = _dial(ctx, pod, container, host, port)
            if (seen == "open") != expected:
                wrong.append(f"{what} ({host}:{port}): {seen}, expected {'open' if expected else 'closed'}")
    if wrong:
        raise StepFailed("; ".join(wrong))


# Grows by 64 MiB of touched pages at a time until the kernel stops it (a program's runaway allocation).
_HOG = ("import time\nheld = []\nwhile True:\n    held.append(b'x' * (64 << 20))\n"
        "    print(len(held) * 64, 'MiB', flush=True)\n    time.sleep(0.01)\n")


def session_out_of_memory(ctx: Context) -> None:
    """A program in a session allocates past the session's memory limit: the kernel kills the session's
    container, Kubernetes reports it (lastState.terminated OOMKilled, restartCount) and restarts it, and the
    user reads what happened in `orz cloud status`; then the session is usable again."""
    session = ctx.facts["other_session"]
    selector = f"orz.cloud/session={session},app.kubernetes.io/component=runner"

    def runner_status() -> dict:
        pods = ctx.cluster.pods(SESSIONS_NS, selector)
        statuses = (pods[0].get("status") or {}).get("containerStatuses") or [] if pods else []
        return next((s for s in statuses if s["name"] == "runner"), {})

    before = int(runner_status().get("restartCount", 0))
    done = ctx.ssh(f"{session}.orz", f"python3 -c {shlex.quote(_HOG)}", check=False, timeout_s=180)
    if done.returncode == 0:
        raise StepFailed(f"the allocation finished without the memory limit stopping it: {done.stdout[-200:]!r}")

    def oom_reported() -> bool:
        status = runner_status()
        last = (status.get("lastState") or {}).get("terminated") or {}
        return last.get("reason") == "OOMKilled" and int(status.get("restartCount", 0)) > before
    ctx.wait("the runner container reported OOMKilled and restarted", oom_reported, 60,
             lambda: f"(runner status {runner_status()}){ctx.pod_summary()}")

    def told() -> str:
        shown = ctx.orz("cloud", "status", session, check=False)
        return shown.stdout if "out_of_memory" in shown.stdout and "memory limit" in shown.stdout else ""
    ctx.wait("`orz cloud status` telling the user the session ran out of memory", lambda: bool(told()), 90,
             lambda: ctx.orz("cloud", "status", session, check=False).stdout[-600:])
    ctx.wait("the session running again", lambda: ctx.session_state(session) == "running", 120,
             lambda: f"(status {ctx.session_state(session)})")
    again = ctx.ssh(f"{session}.orz", "echo back-after-oom", check=False)
    if "back-after-oom" not in again.stdout:
        raise StepFailed(f"ssh after the OOM kill: exit {again.returncode} {again.stderr.strip()[-300:]}")


# Past the chart's 2Gi sizeLimit of a session's /tmp; fallocate takes the blocks at once (dd where it cannot).
_FILL_TMP = ("echo kept-through-eviction > kept.txt && sync && "
             "{ fallocate -l 2200M /tmp/fill || dd if=/dev/zero of=/tmp/fill bs=1M count=2200; } 2>&1; sleep 60")


def session_evicted_for_disk(ctx: Context) -> None:
    """A program in a session fills its /tmp past the Pod's sizeLimit: the kubelet evicts the Pod, the user
    reads in `orz cloud status` what filled up and that the workspace is kept, and the session comes back
    (the reconciler starts it again once; `orz cloud start` when it has already) with its workspace and an
    empty /tmp."""
    session = ctx.facts["other_session"]
    ctx.ssh(f"{session}.orz", _FILL_TMP, check=False, timeout_s=120)

    def told() -> str:
        shown = ctx.orz("cloud", "status", session, check=False)
        return shown.stdout if "Evicted" in shown.stdout and "to /tmp" in shown.stdout else ""
    ctx.wait("`orz cloud status` telling the user the session was evicted for filling /tmp", lambda: bool(told()),
             120, lambda: ctx.orz("cloud", "status", session, check=False).stdout[-600:] + ctx.pod_summary())
    if "workspace is kept" not in told():
        raise StepFailed(f"the status does not say the workspace is kept: {told()[-400:]}")
    ctx.wait("the session running again or failed", lambda: ctx.session_state(session) in ("running", "failed"), 180,
             ctx.pod_summary)
    if ctx.session_state(session) == "failed":
        ctx.orz("cloud", "start", session)
        ctx.wait("the session running again", lambda: ctx.session_state(session) == "running", 180, ctx.pod_summary)
    again = ctx.ssh(f"{session}.orz", "cat kept.txt; ls /tmp/fill 2>&1", check=False)
    if "kept-through-eviction" not in again.stdout or "No such file" not in again.stdout:
        raise StepFailed(f"after the eviction: exit {again.returncode} {again.stdout[-300:]!r} "
                         f"{again.stderr.strip()[-300:]!r}")
    ctx.orz("cloud", "kill", "--force", session)


def scp_round_trip(ctx: Context) -> None:
    local = ctx.workdir / "payload.bin"
    local.write_bytes(os.urandom(2 * 1024 * 1024))
    back = ctx.workdir / "payload.back"
    base = ["scp", "-F", str(ctx.home / ".ssh" / "config"), "-o", "BatchMode=yes"]
    for argv in ([*base, str(local), f"{ctx.session}.orz:payload.bin"],
                 [*base, f"{ctx.session}.orz:payload.bin", str(back)]):
        done = subprocess.run(argv, env=ctx.env(), capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise StepFailed(f"{' '.join(argv[:1] + argv[-2:])}: {done.stderr.strip()[-400:]}")
    if hashlib.sha256(local.read_bytes()).digest() != hashlib.sha256(back.read_bytes()).digest():
        raise StepFailed("the file that came back differs from the one sent")


def local_forward(ctx: Context) -> None:
    """`ssh -L` to a server listening on the session's loopback."""
    ctx.ssh(f"{ctx.session}.orz", "nohup python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    forward = subprocess.Popen(["ssh", "-F", str(ctx.home / ".ssh" / "config"), "-o", "BatchMode=yes", "-N",
                                "-L", f"127.0.0.1:{port}:127.0.0.1:8765", f"{ctx.session}.orz"], env=ctx.env(),
                               stderr=subprocess.PIPE, text=True)
    try:
        def served() -> bool:
            try:
                return "README.md" in httpx.get(f"http://127.0.0.1:{port}/", timeout=3).text
            except httpx.HTTPError:
                return False
        ctx.wait("a page through -L", served, 30)
    finally:
        forward.terminate()
        forward.wait(5)


def web_attach(ctx: Context) -> None:
    """The browser terminal's WebSocket through the gateway's web port, with an attach token."""
    import asyncio

    import websockets

    grant = ctx.api("POST", f"/v1/instances/{ctx.session}/attach", json={"readonly": False})
    if grant.status_code != 200:
        raise StepFailed(f"POST attach answered {grant.status_code}: {grant.text[:300]}")
    url = grant.json()["attach_url"]
    if ctx.edge.web_host not in url:
        raise StepFailed(f"attach_url {url!r} does not name the gateway's web address {ctx.edge.web_host}")

    async def talk() -> str:
        seen = b""
        # The page's subprotocol: the gateway sends JSON control messages (`attached`) only with it.
        async with websockets.connect(url, open_timeout=30, subprotocols=["orz.terminal.v1"]) as ws:
            # Keys go once the gateway says the terminal is attached (the page waits for it too).
            while True:
                frame = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(frame, str) and json.loads(frame).get("type") == "attached":
                    break
                if isinstance(frame, str) and json.loads(frame).get("type") == "error":
                    return frame
            await ws.send(b"echo web-$((6*7))\r")
            deadline = time.monotonic() + 60
            while b"web-42" not in seen and time.monotonic() < deadline:
                frame = await asyncio.wait_for(ws.recv(), 60)
                seen += frame if isinstance(frame, bytes) else frame.encode()
        return seen.decode(errors="replace")

    text = asyncio.run(talk())
    if "web-42" not in text:
        raise StepFailed(f"the web terminal did not echo: {text[-300:]!r}")


def stop_and_wake(ctx: Context) -> None:
    ctx.orz("cloud", "stop", ctx.session)
    ctx.wait("the session stopped", lambda: ctx.session_state() == "stopped", 120)
    pods = ctx.cluster.pods(SESSIONS_NS)
    if any(p["metadata"]["labels"].get("orz.cloud/session") == ctx.session for p in pods):
        raise StepFailed("the stopped session still has a Pod")
    # Wake on connect: plain ssh starts it again, and the workspace is the one it had.
    done = ctx.ssh(f"{ctx.session}.orz", "sha256sum payload.bin; cat .init-marker", timeout_s=240)
    want = hashlib.sha256((ctx.workdir / "payload.bin").read_bytes()).hexdigest()
    if want not in done.stdout or "init-ran" not in done.stdout:
        raise StepFailed(f"after wake the workspace differs: {done.stdout!r}")


def kill_gateway_and_api(ctx: Context) -> None:
    """kill -9 of one gateway and one API replica while a user works; the next connection still works."""
    gateway = ctx.component_pods("gateway")[0]
    api = ctx.component_pods("api")[0]
    ctx.cluster.kill_container(gateway, "gateway")
    ctx.cluster.kill_container(api, "api")
    for _attempt in range(3):
        done = ctx.ssh(f"{ctx.session}.orz", "echo still-here", check=False)
        listed = ctx.orz("cloud", "list", check=False)
        if "still-here" in done.stdout and listed.returncode == 0:
            break
        time.sleep(2)
    else:
        raise StepFailed(f"after the kills: ssh {done.stderr.strip()[-200:]!r}, list {listed.stderr[-200:]!r}")
    ctx.wait("the killed replicas back Ready", lambda: len(ctx.component_pods("gateway")) == 2 and
             len(ctx.component_pods("api")) == 2, 120, ctx.pod_summary)


def rolling_restart_with_user_attached(ctx: Context) -> None:
    """`kubectl rollout restart` of the gateways while a user works in `orz cloud attach`: the terminal
    says the gateway restarts, attach reconnects by itself (through the same address, to a new replica)
    and the user types on in the same tmux session."""
    import pexpect

    before = {p["metadata"]["name"] for p in ctx.component_pods("gateway", ready=False)}
    transcript = io.StringIO()
    child = pexpect.spawn(str(Path(sys.executable).parent / "orz"), ["cloud", "attach", ctx.session],
                          env={**ctx.env(), "TERM": "xterm"}, encoding="utf-8", timeout=90, dimensions=(24, 100))
    child.logfile_read = transcript

    def seen() -> str:
        return f"(terminal: {transcript.getvalue()[-600:]!r}){ctx.pod_summary()}"

    def type_and_see(word: str, timeout_s: float) -> bool:
        child.sendline(f"echo {word[:3]}''{word[3:]}")  # the echo of what is typed cannot match
        try:
            child.expect(word, timeout=timeout_s)
        except (pexpect.TIMEOUT, pexpect.EOF):
            return False
        return True

    waiting_for = "tmux's status line"
    try:
        try:
            child.expect(r"\[main\]")  # attached
            time.sleep(0.5)
            if not type_and_see("before-restart", 30):
                raise StepFailed(f"the attached terminal did not echo {seen()}")
            ctx.cluster.restart_deployment(NS, f"{RELEASE}-orzbob-cloud-gateway")
            waiting_for = "the draining gateway's line"
            child.expect("this gateway is restarting", timeout=240)
            waiting_for = "attach to reconnect"
            child.expect(f"reconnecting to {ctx.session}", timeout=240)
        except (pexpect.TIMEOUT, pexpect.EOF) as exc:
            raise StepFailed(f"{type(exc).__name__} waiting for {waiting_for} {seen()}") from None
        # The rollout ends when every old replica is gone, terminating ones included (their drains over).
        def rolled() -> bool:
            new = [p for p in ctx.component_pods("gateway") if p["metadata"]["name"] not in before]
            return len(new) == 2 and not before & {p["metadata"]["name"] for p in ctx.cluster.objects("pods", NS)}

        ctx.wait("the restarted gateways Ready and the old ones gone", rolled, 300, seen)
        # attach may be reconnecting right now (the user's last replica only just went): keep typing.
        if not any(type_and_see(f"after-restart-{n}", 15) for n in range(6)):
            raise StepFailed(f"no echo in the terminal after the restart {seen()}")
        child.send("\x02d")  # Ctrl-b d: a detach ends attach (no reconnect)
        child.expect("detached", timeout=30)
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    if child.exitstatus != 0:
        raise StepFailed(f"orz cloud attach exited {child.exitstatus} after the detach {seen()}")
    text = transcript.getvalue()
    ctx.facts["gateway_restarts_seen"] = text.count("reconnecting to")
    if ctx.session_state() != "running":
        raise StepFailed(f"the session is {ctx.session_state()} after the restart")


def scheduler_lease_moves(ctx: Context) -> None:
    """Delete the scheduler's Pod: its replacement takes the lease and the reaper runs again."""
    old = ctx.component_pods("scheduler")[0]
    holder_before = lease_holder(ctx)
    ctx.cluster.delete_pod(NS, old["metadata"]["name"])
    ctx.wait("a new scheduler Ready", lambda: any(p["metadata"]["uid"] != old["metadata"]["uid"]
                                                  for p in ctx.component_pods("scheduler")), 120, ctx.pod_summary)
    ctx.wait("the lease held by the new scheduler", lambda: lease_holder(ctx) not in ("", holder_before), 90,
             lambda: f"(holder {lease_holder(ctx)!r}, before {holder_before!r})")


def lease_holder(ctx: Context) -> str:
    """The scheduler lease's holder, read with psql in the PostgreSQL Pod."""
    pg = ctx.cluster.ready_pods(NS, SELECTOR + "postgresql")
    if not pg:
        return ""
    done = ctx.cluster.exec_in(pg[0], "postgresql", ["psql", "-h", "/var/run/postgresql", "-U", "orz", "-d", "orz",
                                                     "-Atc", "SELECT holder FROM scheduler_leases"])
    return done.stdout.decode().strip() if done.returncode == 0 else ""


def schema_revision(ctx: Context) -> str:
    pg = ctx.cluster.ready_pods(NS, SELECTOR + "postgresql")
    done = ctx.cluster.exec_in(pg[0], "postgresql", ["psql", "-h", "/var/run/postgresql", "-U", "orz", "-d", "orz",
                                                     "-Atc", "SELECT version_num FROM alembic_version"])
    return done.stdout.decode().strip()


def _image_tags(ctx: Context, component: str) -> set[str]:
    return {c["image"].rsplit(":", 1)[-1] for p in ctx.component_pods(component) for c in p["spec"]["containers"]}


def helm_upgrade(ctx: Context) -> None:
    """The next release (one more expand-only migration) with changed values, rolled out with --wait."""
    before = schema_revision(ctx)
    done = ctx.cluster.helm("upgrade", RELEASE, str(CHART), "-n", NS, *ctx.edge.values, "--set",
                            "config.logLevel=DEBUG", "--set", f"image.tag={versions.NEXT_TAG}", "--wait",
                            "--timeout", "240s", timeout_s=400)
    if done.returncode != 0:
        raise StepFailed(f"helm upgrade --wait: {done.stderr.strip()[-800:]}{ctx.pod_summary()}")
    api = ctx.component_pods("api")
    if not api or any(_env(p, "api", "ORZ_LOG_LEVEL") != "DEBUG" for p in api) or \
            _image_tags(ctx, "api") != {versions.NEXT_TAG}:
        raise StepFailed("the API Pods do not run the upgraded release and values")
    after = schema_revision(ctx)
    if after != versions.NEXT_REVISION:
        raise StepFailed(f"the upgrade's migration did not run: schema {before} -> {after}")
    done = ctx.ssh(f"{ctx.session}.orz", "echo after-upgrade")
    if "after-upgrade" not in done.stdout:
        raise StepFailed(f"after the upgrade: {done.stdout!r}")


def helm_rollback(ctx: Context) -> None:
    """Back to revision 1: the previous code runs, Ready and without restarts, on the newer schema."""
    done = ctx.cluster.helm("rollback", RELEASE, "1", "-n", NS, "--wait", "--timeout", "240s", timeout_s=400)
    if done.returncode != 0:
        raise StepFailed(f"helm rollback --wait: {done.stderr.strip()[-800:]}{ctx.pod_summary()}")
    api = ctx.component_pods("api")
    if not api or any(_env(p, "api", "ORZ_LOG_LEVEL") == "DEBUG" for p in api) or \
            _image_tags(ctx, "api") != {ctx.edge.image_tag}:
        raise StepFailed("the API Pods still run the upgraded release or values")
    restarts = {p["metadata"]["name"]: s.get("restartCount", 0) for p in api
                for s in p["status"].get("containerStatuses") or [] if s.get("restartCount")}
    if restarts:
        raise StepFailed(f"the previous release restarts on the newer schema: {restarts}{ctx.pod_summary()}")
    if schema_revision(ctx) != versions.NEXT_REVISION:
        raise StepFailed(f"the schema moved on rollback: {schema_revision(ctx)}")
    done = ctx.ssh(f"{ctx.session}.orz", "echo after-rollback")
    if "after-rollback" not in done.stdout:
        raise StepFailed(f"after the rollback: {done.stdout!r}")
    ctx.orz("cloud", "list")


def kill_session(ctx: Context) -> None:
    """The scp step left payload.bin uncommitted (and the fixture's git daemon takes no pushes): `kill`
    refuses to throw that away and says why; `--force` removes everything."""
    refused = ctx.orz("cloud", "kill", ctx.session, check=False)
    if refused.returncode != 6 or "unsaved work" not in refused.stderr:
        raise StepFailed(f"kill of a session with uncommitted files: exit {refused.returncode} "
                         f"{refused.stderr.strip()[-300:]!r} (want 6, unsaved work)")
    ctx.orz("cloud", "kill", "--force", ctx.session)
    ctx.wait("the session's objects gone", lambda: not any(
        o["metadata"].get("labels", {}).get("orz.cloud/session") == ctx.session
        for plural in ("pods", "persistentvolumeclaims", "secrets", "configmaps")
        for o in ctx.cluster.objects(plural, SESSIONS_NS)), 120)


def no_rbac_denials(ctx: Context) -> None:
    """A Pod's service account refused by RBAC is a chart bug even when no step tripped over it yet."""
    if not ctx.cluster.reports_denials:
        raise NotApplicable("this cluster's API server does not report denials to the steps")
    if ctx.cluster.denials:
        raise StepFailed("denied: " + "; ".join(sorted(set(ctx.cluster.denials))[:5]))


def _env(pod: dict, container: str, name: str) -> str | None:
    for c in pod["spec"]["containers"]:
        if c["name"] == container:
            for var in c.get("env") or []:
                if var["name"] == name:
                    return var.get("value")
    return None


Step = tuple[str, Callable[[Context], None]]
STEPS: list[Step] = [
    ("helm install without config.publicSshHost is refused", install_needs_ssh_host),
    ("helm install --wait", helm_install),
    ("control plane Ready (2 api, 2 gateway, scheduler, postgresql)", control_plane_ready),
    ("bootstrap org, user and token (kubectl exec)", bootstrap_user),
    ("public ingress serves /v1, never /internal or /metrics", internal_routes_stay_inside),
    ("git fixture served", make_repo),
    ("orz cloud new -> running", create_session),
    ("ssh through each gateway replica and the load balancer; git works", ssh_each_gateway),
    ("a session Pod reaches the API's HTTP port only; the gateway still reaches runners (NetworkPolicy)",
     session_network_confined),
    ("a program past the session's memory limit: OOMKilled, restarted, and the user is told",
     session_out_of_memory),
    ("a session that fills its /tmp past the limit: evicted, the user is told, started again with its workspace",
     session_evicted_for_disk),
    ("scp up and down, same checksum", scp_round_trip),
    ("ssh -L to the session's loopback", local_forward),
    ("web terminal attach", web_attach),
    ("stop, then wake by ssh with the workspace intact", stop_and_wake),
    ("kill -9 a gateway and an API replica, reconnect", kill_gateway_and_api),
    ("rolling restart of the gateways with a user attached: orz cloud attach reconnects",
     rolling_restart_with_user_attached),
    ("scheduler Pod deleted, lease moves", scheduler_lease_moves),
    ("helm upgrade --wait to the next release (one more migration) with changed values", helm_upgrade),
    ("helm rollback --wait: the previous release runs on the newer schema", helm_rollback),
    ("orz cloud kill refuses unsaved work; --force removes the session's objects", kill_session),
    ("every component kept within its RBAC (no request denied)", no_rbac_denials),
]
# CI's shorter profile leaves out what repeats a path already shown.
CI_SKIP = {"ssh -L to the session's loopback"}


def run(workdir: Path, helm: Path, profile: str = "full", out: Callable[[str], None] = print, *,
        access: str = "direct", kubeconfig: Path | None = None, values: Path = VALUES) -> int:
    """Run the steps; print one line each and a summary; the number of failed steps.

    With `kubeconfig` the steps run on that cluster (users through port-forwards); without it on the
    rehearsal's own cluster, which users reach by its load balancers (`direct`) or by port-forward (`api`).
    """
    shutil.rmtree(workdir, ignore_errors=True)
    home = workdir / "user"
    home.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if kubeconfig is not None:
            cluster: KubeAccess = KubeAccess(kubeconfig, helm, workdir)
        else:
            from rehearsal.cluster import RehearsalAccess, RehearsalCluster

            rehearsal = stack.enter_context(RehearsalCluster(workdir / "cluster", helm, LB_ADDRESSES))
            images.CODE_BY_TAG[versions.NEXT_TAG] = versions.make_next_release(workdir / "next-release")
            cluster = RehearsalAccess(rehearsal, workdir, remote=access == "api")
        stack.callback(cluster.close)
        edge = load_balancer_edge(values) if kubeconfig is None and access == "direct" else \
            forwarded_edge(cluster, values)
        stack.callback(edge.close)
        ctx = Context(cluster=cluster, edge=edge, workdir=workdir, home=home)
        results = _run_steps(ctx, profile, out)
        if kubeconfig is None and any(r[1] is False for r in results):
            # A step failed: keep the Pods' logs and history, which go with the cluster at the end of this block.
            evidence.save_quietly(rehearsal, f"rehearsal-{access}", out)
        if cluster.denials:
            out("RBAC denials seen: " + "; ".join(sorted(set(cluster.denials))[:5]))
    ran = [r for r in results if r[1] is not None]
    passed = sum(1 for r in ran if r[1])
    skipped = len(results) - len(ran)
    out(f"rehearsal: {passed}/{len(ran)} steps passed" + (f" ({skipped} not applicable here)" if skipped else ""))
    (workdir / "report.json").write_text(json.dumps([{"step": n, "passed": p, "seconds": round(s, 1), "detail": d}
                                                     for n, p, s, d in results], indent=2))
    return len(ran) - passed


def _run_steps(ctx: Context, profile: str, out: Callable[[str], None]) -> list[tuple[str, bool | None, float, str]]:
    """(step, passed or None when not applicable, seconds, detail) for each step of the profile."""
    results: list[tuple[str, bool | None, float, str]] = []
    failed = False
    for name, fn in STEPS:
        if profile == "ci" and name in CI_SKIP:
            continue
        if failed:
            results.append((name, False, 0.0, "not run: an earlier step failed"))
            out(f"SKIP  {name}")
            continue
        started = time.monotonic()
        try:
            fn(ctx)
            results.append((name, True, time.monotonic() - started, ""))
            out(f"PASS  {name} ({time.monotonic() - started:.1f} s)")
        except NotApplicable as why:
            results.append((name, None, 0.0, str(why)))
            out(f"N/A   {name} ({why})")
        except (StepFailed, subprocess.TimeoutExpired, httpx.HTTPError, RuntimeError, OSError, ApiException) as exc:
            failed = True
            reason = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            results.append((name, False, time.monotonic() - started, reason))
            out(f"FAIL  {name} ({time.monotonic() - started:.1f} s)\n      {reason}")
    return results
