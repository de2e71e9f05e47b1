"""A kubelet that runs every Pod of the rehearsal's API server as real processes on this machine.

For each Pod: its own network namespace and address (``rehearsal.network``); each volume made on disk
(Secret and ConfigMap files with their modes and the Pod's fsGroup, emptyDirs, PVCs kept across Pods, the
service-account token when automounted); init containers in order, then the containers, each through
``rehearsal.container_init`` with the rendered command, args and environment (``value``, ``secretKeyRef``,
``configMapKeyRef``, ``fieldRef``, ``envFrom``, ``$(VAR)``), its user and read-only root; startup,
readiness and liveness probes (HTTP, TCP, exec) as declared; restarts by restartPolicy with a short
CrashLoopBackOff; status, conditions and podIP written back. Deleting a Pod sends SIGTERM to each
container's PID 1, waits for the grace period, then SIGKILL, and only then removes the Pod.

NetworkPolicy holds for every Pod from before its first container starts (``rehearsal.policy``: nftables in
the Pod's network namespace, Services DNATed there as kube-proxy would). Each container runs in cgroups
(v1) of its own made with the local provider's helper (``sandbox_launch.make_cgroups``), and so does every
exec into it: its ``resources.limits.memory`` and a pids limit (``POD_PIDS_LIMIT``, standing in for the
kubelet's ``--pod-max-pids``, which holds per Pod; here it holds per container). When the OOM killer ends a
process of a container, the whole container is killed, as with cgroup v2's ``memory.oom.group`` that the
kubelet sets since Kubernetes 1.28, and it is reported as Kubernetes does: ``lastState.terminated`` with
reason ``OOMKilled`` and exit code 137, ``restartCount`` up, an ``OOMKilling`` Event, then the restart its
restartPolicy asks for.

Local storage limits are enforced as the kubelet's eviction manager does, checked every
``STORAGE_CHECK_S``: an emptyDir (not in memory) past its ``sizeLimit``, a Pod past the sum of its
containers' ``ephemeral-storage`` limits (its disk emptyDirs and its containers' logs; a writable root is
a tmpfs here, held by the memory limit), or one container past its own. The Pod is evicted at once
(grace period 0) and kept, as Kubernetes keeps it: phase ``Failed``, reason ``Evicted``, the kubelet's
message, a ``DisruptionTarget`` condition and an ``Evicted`` Event.

No value of a container's environment (the runner token, the session's secrets) is ever on a command line,
which every local user reads in /proc/<pid>/cmdline: a container gets it from its config file (mode 0600),
an exec (probes, ``kubectl exec``) through its process environment (``Container.exec``).

What it does not do: pull images (``rehearsal.images`` maps ours to this checkout), enforce CPU limits
(no CFS quota: a shared CI machine would only get slower), evict for node pressure or by requests (the
node never runs low), or schedule across nodes (one node).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.instances.providers import sandbox_launch
from api.settings import quantity_bytes
from rehearsal import images
from rehearsal.network import Network
from rehearsal.policy import Enforcer
from rehearsal.store import ApiError, Obj, Store, now_rfc3339

log = logging.getLogger("rehearsal.kubelet")
NODE = "rehearsal-node"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # noqa: S105  # nosec B105  # a path, not a secret
MAX_BACKOFF_S = 10.0  # a real kubelet caps CrashLoopBackOff at 300 s; a rehearsal cannot wait that long
# Each container's own pids cgroup gets this many tasks: the kubelet's --pod-max-pids, which a real node
# sets for the same reason (a fork bomb in one Pod must not take the node); Kubernetes' default is unlimited.
POD_PIDS_LIMIT = 4096
KILLED_EXIT_CODE = 128 + signal.SIGKILL  # what the runtime reports for a container ended by SIGKILL
OOM_EXIT_CODE = KILLED_EXIT_CODE  # the OOM killer's too
STORAGE_CHECK_S = 2.0  # how often a Pod's disk use is measured; the kubelet's eviction manager checks every 10 s
HISTORY_PER_POD = 400  # what each Pod's worker remembers for the evidence (rehearsal.evidence): bounded
# Runs before a container's (or an exec's) first process: the shell joins the container's cgroups ("0": the
# writer itself), then becomes the command; the cgroups' limits hold for everything it starts.
JOIN_CGROUPS = 'for g in $ORZ_CGROUP_PROCS; do echo 0 > "$g" || exit 125; done; unset ORZ_CGROUP_PROCS; exec "$@"'
# For an exec into a container, the step nsenter runs inside it: reads the container's environment from an
# inherited file (argv[1], a memfd) and becomes the command with exactly that. The environment never passes
# through a command line (world-readable in /proc/<pid>/cmdline; it holds the runner token and the user's
# secrets), nor through the environment of the host's root shell and nsenter: a service's env may name
# LD_PRELOAD or GCONV_PATH, which they would load from the session's own files before entering the container.
EXEC_WITH_ENV = """import json, os, sys
with os.fdopen(int(sys.argv[1]), "rb") as given:
    env = json.load(given)
try:
    os.execvpe(sys.argv[2], sys.argv[2:], env)
except OSError as exc:
    print(f"exec: {sys.argv[2]}: {exc.strerror}", file=sys.stderr, flush=True)
    sys.exit(126 if isinstance(exc, PermissionError) else 127)
"""
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


class ContainerConfigError(Exception):
    """The container cannot be created yet (a missing Secret key, a root user with runAsNonRoot...)."""


@dataclass
class ServiceAccountTokens:
    """Tokens the kubelet mounts, by the identity they stand for (the API server's authenticator reads it)."""

    by_token: dict[str, tuple[str, str]] = field(default_factory=dict)

    def issue(self, namespace: str, account: str) -> str:
        token = f"rehearsal-{secrets.token_urlsafe(24)}"
        self.by_token[token] = (namespace, account)
        return token


@dataclass
class Cluster:
    """What every pod worker needs to know about the rehearsal's cluster."""

    store: Store
    network: Network
    workdir: Path
    api_host: str
    api_port: int
    ca_file: Path
    tokens: ServiceAccountTokens
    logs: dict[tuple[str, str, str], Path]
    cluster_domain: str = "cluster.local"
    policy: Enforcer | None = None  # NetworkPolicy (rehearsal.policy); None: every Pod open, as without a CNI's


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references to variables defined before; $$ escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def _iso(epoch: float) -> str:
    """A wall-clock time with milliseconds, UTC (the history's: readiness flips are sub-second apart)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _disk_usage(path: Path) -> int:
    """Bytes of disk ``path`` takes (allocated blocks, as du counts; a sparse file's holes are free), not
    following symbolic links or crossing into other file systems."""
    try:
        top = path.lstat()
    except OSError:
        return 0
    total, pending = top.st_blocks * 512, [path] if path.is_dir() and not path.is_symlink() else []
    while pending:
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if info.st_dev != top.st_dev:
                        continue
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
    return total


def _quantity(size: int) -> str:
    """A byte count as Kubernetes prints a quantity: the largest binary unit that divides it."""
    for suffix, scale in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale}{suffix}"
    return str(size)


def _field(pod: Obj, path: str) -> str:
    node: Any = pod
    # A subscript keeps its dots: metadata.labels['app.kubernetes.io/name'] names one label.
    for quoted, plain in re.findall(r"\['([^']*)'\]|([^.\[\]]+)", path):
        part = quoted or plain
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


class Container:
    """One running container: its process (the `unshare` that holds the namespaces) and its PID 1."""

    def __init__(self, spec: Obj, process: subprocess.Popen[bytes], log_path: Path, env: dict[str, str],
                 uid: int, gid: int, cgroups: list[Path] | None = None) -> None:
        self.spec = spec
        self.cgroups = cgroups or []
        self.oom_killed = False
        self.process = process
        self.log_path = log_path
        self.env = env
        self.uid, self.gid = uid, gid
        self.started_at = now_rfc3339()
        self.started_mono = time.monotonic()
        self.ready = False
        self.started = not spec.get("startupProbe")
        self.probe_due: dict[str, float] = {}
        self.failures: dict[str, int] = {}

    def oom_kills(self) -> int:
        """How many times the kernel's OOM killer ended a process of this container (its memory cgroup's count)."""
        for group in self.cgroups:
            if "/memory/" in str(group):
                with contextlib.suppress(OSError):
                    for line in (group / "memory.oom_control").read_text().splitlines():
                        if line.startswith("oom_kill "):
                            return int(line.split()[1])
        return 0

    def init_pid(self) -> int | None:
        """The host pid of the container's PID 1 (the child `unshare --fork` made)."""
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            if children:
                return int(children[0])
        return None

    def signal(self, signum: int) -> None:
        pid = self.init_pid()
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(pid if pid else self.process.pid, signum)

    def exec(self, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes] | None:
        """Run a command in the container's namespaces as its user (probes and `kubectl exec`)."""
        pid = self.init_pid()
        if pid is None:
            return None
        # The container's environment, exactly, given to the step inside it (EXEC_WITH_ENV) in a memfd: the
        # host side (a shell joining the container's cgroups, as a runtime's exec is: what it allocates counts
        # against the limit; then nsenter) runs with the kubelet's PATH and nothing of the container's.
        env_fd = os.memfd_create("orz-exec-env")
        try:
            data = memoryview(json.dumps(self.env).encode())
            while data:
                data = data[os.write(env_fd, data):]
            os.lseek(env_fd, 0, os.SEEK_SET)
            cmd = [NSENTER, "-t", str(pid), "-m", "-n", "-p", "-r", "-w", "-S", str(self.uid), "-G", str(self.gid),
                   "--", sys.executable, "-I", "-S", "-c", EXEC_WITH_ENV, str(env_fd), *argv]
            host_env = {"PATH": os.environ.get("PATH", ""),
                        "ORZ_CGROUP_PROCS": " ".join(str(g / "cgroup.procs") for g in self.cgroups)}
            try:
                return subprocess.run(["/bin/sh", "-c", JOIN_CGROUPS, "sh", *cmd], capture_output=True,
                                      timeout=timeout_s, check=False, env=host_env, pass_fds=(env_fd,))
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(cmd, 124, b"", b"timed out")
        finally:
            os.close(env_fd)


class PodWorker:
    """Runs one Pod from admission to removal, in a thread of its own."""

    def __init__(self, cluster: Cluster, pod: Obj) -> None:
        self.c = cluster
        self.ns = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.pod = pod
        self.dir = cluster.workdir / "pods" / self.uid
        self.ip = ""
        self.containers: dict[str, Container] = {}
        self.restarts: dict[str, int] = {}
        self.last_state: dict[str, Obj] = {}
        self.waiting: dict[str, Obj] = {}
        self.terminated: dict[str, Obj] = {}
        self.initialized = False
        self.phase = "Pending"
        self.backoff_until: dict[str, float] = {}
        self.skipped: str | None = None
        self.evicted: str | None = None  # the eviction's message, once the Pod is evicted
        self.storage_due = 0.0
        # What happened to this Pod, with times (starts, exits, probe failures, readiness changes): a soak or a
        # step that failed saves it with the logs (rehearsal.evidence), where status alone shows only the end.
        self.history: deque[Obj] = deque(maxlen=HISTORY_PER_POD)
        self.transitions: dict[str, str] = {}  # condition type -> lastTransitionTime
        self._events: dict[tuple[str, str], Obj] = {}  # (reason, container) -> the Event object, counted
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    def note(self, reason: str, message: str, container: str = "", warning: bool = False, **extra: Any) -> None:
        """Remember what happened (history) and tell the API as a kubelet does: an Event on the Pod, one per
        reason and container, its count and last time bumped when it repeats (as the kubelet aggregates)."""
        now = time.time()
        self.history.append({"time": _iso(now), "t": round(now, 3), "reason": reason, "container": container,
                             "message": message, **extra})
        key = (reason, container)
        event = self._events.get(key)
        stamp = now_rfc3339()
        with contextlib.suppress(ApiError):
            if event is None:
                event = self.c.store.create("events", self.ns, {
                    "apiVersion": "v1", "kind": "Event",
                    "metadata": {"generateName": f"{self.name}.", "namespace": self.ns},
                    "involvedObject": {"kind": "Pod", "namespace": self.ns, "name": self.name, "uid": self.uid,
                                       **({"fieldPath": f"spec.containers{{{container}}}"} if container else {})},
                    "reason": reason, "message": message, "type": "Warning" if warning else "Normal",
                    "source": {"component": "kubelet", "host": NODE}, "count": 1,
                    "firstTimestamp": stamp, "lastTimestamp": stamp})
            else:
                event = self.c.store.replace("events", self.ns, event["metadata"]["name"], {
                    **event, "message": message, "count": int(event.get("count", 1)) + 1, "lastTimestamp": stamp})
            self._events[key] = event

    # ------------------------------------------------------------------------------------ lifecycle

    def _run(self) -> None:
        try:
            self._admit()
            while not self._stop.is_set():
                current = self.c.store.find("pods", self.ns, self.name)
                if current is None or current["metadata"]["uid"] != self.uid:
                    self._kill_all(grace_s=0)  # force-deleted
                    break
                self.pod = current
                if current["metadata"].get("deletionTimestamp"):
                    self._terminate(int(current["metadata"].get("deletionGracePeriodSeconds") or 0))
                    break
                if self.phase in ("Succeeded", "Failed"):
                    self._stop.wait(0.5)
                    continue
                self._step()
                self._report()
                self._stop.wait(0.25)
        except Exception:  # a kubelet bug shows as a failed pod, never a silent hang
            log.exception("pod %s/%s", self.ns, self.name)
            self.phase = "Failed"
            with contextlib.suppress(Exception):
                self._report(reason="KubeletError")
        finally:
            self._cleanup()

    def stop(self) -> None:
        self._stop.set()
        self._kill_all(grace_s=0)
        self.thread.join(10)

    def _admit(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.pod["spec"]
        spec_with_node = {**self.pod, "spec": {**spec, "nodeName": NODE}}
        with contextlib.suppress(ApiError):
            self.pod = self.c.store.replace("pods", self.ns, self.name, spec_with_node)
        self.ip = self.c.network.attach(self.uid).address
        if self.c.policy is not None:
            # The Pod's NetworkPolicy holds before its first process runs, as a CNI plugin's does.
            self.c.policy.sync(only=self.uid)
        self.hosts = self.dir / "hosts"
        self.write_hosts()
        # Cluster DNS is /etc/hosts here; the nameserver is the bridge, where nothing answers on port 53,
        # so any other name fails at once (ICMP unreachable) instead of waiting out the host's resolver.
        self.resolv = self.dir / "resolv.conf"
        domain = self.c.cluster_domain
        self.resolv.write_text(f"search {self.ns}.svc.{domain} svc.{domain} {domain}\n"
                               f"nameserver {self.c.api_host}\noptions ndots:5 timeout:1 attempts:1\n")

    def write_hosts(self) -> None:
        """Service names of every namespace -> cluster IPs (what cluster DNS would answer)."""
        lines = ["127.0.0.1 localhost", f"{self.ip} {self.name}"]
        services, _, _ = self.c.store.list("services", None)
        for svc in services:
            address = (svc.get("spec") or {}).get("clusterIP")
            if not address or address == "None":
                continue
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            names = [f"{name}.{ns}.svc.{self.c.cluster_domain}", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == self.ns:
                names.append(name)
            lines.append(f"{address} {' '.join(names)}")
        text = "\n".join(lines) + "\n"
        if not self.hosts.exists() or self.hosts.read_text() != text:
            # Rewritten in place: the containers see the file through a bind mount of this inode.
            with self.hosts.open("w") as f:
                f.write(text)

    # ---------------------------------------------------------------------------------- one step

    def _step(self) -> None:
        self.write_hosts()
        spec = self.pod["spec"]
        if not self.initialized:
            for init in spec.get("initContainers") or []:
                name = init["name"]
                if self.terminated.get(name, {}).get("exitCode") == 0:
                    continue
                running = self.containers.get(name)
                if running is None:
                    self._maybe_start(init)
                    return
                code = running.process.poll()
                if code is None:
                    return
                self._exited(init, code)
                if code != 0 and spec.get("restartPolicy") == "Never":
                    self.phase = "Failed"
                return
            self.initialized = True
        for container in spec["containers"]:
            name = container["name"]
            running = self.containers.get(name)
            if running is None:
                if self.terminated.get(name) and not self._should_restart(self.terminated[name]["exitCode"]):
                    continue
                self._maybe_start(container)
                continue
            code = running.process.poll()
            if code is not None:
                self._exited(container, code)
                continue
            if not running.oom_killed and running.oom_kills() > 0:
                # The OOM killer ended one process; the whole container goes, as with cgroup v2's
                # memory.oom.group, which the kubelet sets on every container since Kubernetes 1.28.
                running.oom_killed = True
                log.info("pod %s/%s: container %s out of memory: killed", self.ns, self.name, name)
                self.note("OOMKilling", f"Memory cgroup out of memory: container {name} killed (limit "
                          f"{((container.get('resources') or {}).get('limits') or {}).get('memory')})", name,
                          warning=True)
                running.signal(signal.SIGKILL)
                continue
            self._probe(running)
        if self.initialized and time.monotonic() >= self.storage_due:
            self.storage_due = time.monotonic() + STORAGE_CHECK_S
            over = self._storage_over_limit()
            if over:
                self._evict(over)
                return
        if self.skipped:
            self.phase = "Pending"
        elif all(c["name"] in self.terminated and c["name"] not in self.containers and
                 not self._should_restart(self.terminated[c["name"]]["exitCode"]) for c in spec["containers"]):
            failed = any(self.terminated[c["name"]]["exitCode"] != 0 for c in spec["containers"])
            self.phase = "Failed" if failed else "Succeeded"
        elif self.containers:
            self.phase = "Running"

    def _should_restart(self, code: int) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def _exited(self, container: Obj, code: int) -> None:
        name = container["name"]
        running = self.containers.pop(name)
        oom = running.oom_killed or running.oom_kills() > 0
        sandbox_launch.leave_cgroups(running.cgroups)
        if oom:
            code = OOM_EXIT_CODE
        state = {"exitCode": code, "reason": "OOMKilled" if oom else "Completed" if code == 0 else "Error",
                 "startedAt": running.started_at, "finishedAt": now_rfc3339()}
        self.terminated[name] = state
        self.last_state[name] = {"terminated": state}
        self.note("Exited", f"container {name} exited {code}", name, warning=code != 0, exitCode=code)
        if name in self._init_names():
            restart = code != 0 and self.pod["spec"].get("restartPolicy", "Always") != "Never"
        else:
            restart = self._should_restart(code)
        if restart:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            delay = min(MAX_BACKOFF_S, 0.5 * 2 ** min(self.restarts[name], 6))
            self.backoff_until[name] = time.monotonic() + delay
            self.waiting[name] = {"reason": "CrashLoopBackOff",
                                  "message": f"back-off {delay:.0f}s restarting failed container={name}"}
            log.info("pod %s/%s container %s exited %s; restarting", self.ns, self.name, name, code)
            self.note("BackOff", self.waiting[name]["message"], name, warning=True)

    def _init_names(self) -> set[str]:
        return {c["name"] for c in self.pod["spec"].get("initContainers") or []}

    def _maybe_start(self, container: Obj) -> None:
        name = container["name"]
        if time.monotonic() < self.backoff_until.get(name, 0):
            return
        try:
            self.containers[name] = self._start(container)
            self.waiting.pop(name, None)
            if name not in self._init_names():
                self.terminated.pop(name, None)
        except images.ImageNotRunnable as exc:
            self.skipped = str(exc)
            self.waiting[name] = {"reason": "ImageNotRunnable", "message": str(exc)}
        except ContainerConfigError as exc:
            self.waiting[name] = {"reason": "CreateContainerConfigError", "message": str(exc)}
            self.backoff_until[name] = time.monotonic() + 1.0

    # ---------------------------------------------------------------------------- the container

    def _security(self, container: Obj, image: images.ImageConfig) -> tuple[int, int, list[int], Obj]:
        pod_sc = self.pod["spec"].get("securityContext") or {}
        sc = {**pod_sc, **(container.get("securityContext") or {})}
        uid = int(sc.get("runAsUser", image.uid))
        gid = int(sc.get("runAsGroup", image.gid if "runAsUser" not in sc else uid))
        if sc.get("runAsNonRoot") and uid == 0:
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
        groups = [gid, *([int(pod_sc["fsGroup"])] if "fsGroup" in pod_sc else []),
                  *(int(g) for g in pod_sc.get("supplementalGroups") or [])]
        return uid, gid, sorted(set(groups)), sc

    def _env(self, container: Obj, image: images.ImageConfig, uid: int) -> dict[str, str]:
        env: dict[str, str] = {}
        env.update(image.env)
        home = next((u[3] for u in image.users if u[1] == uid), "/root" if uid == 0 else "/")
        env.setdefault("HOME", home)
        env["HOSTNAME"] = self.name
        env["KUBERNETES_SERVICE_HOST"] = self.c.api_host
        env["KUBERNETES_SERVICE_PORT"] = str(self.c.api_port)
        defined: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                data = self._secret(source["secretRef"]["name"], optional=source["secretRef"].get("optional", False))
            else:
                data = self._config_map(source["configMapRef"]["name"],
                                        optional=source["configMapRef"].get("optional", False))
            defined.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            name = var["name"]
            if "value" in var:
                defined[name] = _expand(str(var["value"]), defined)
                continue
            ref = var.get("valueFrom") or {}
            if "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                value = self._secret(r["name"], optional=r.get("optional", False)).get(r["key"])
                if value is None and not r.get("optional", False):
                    raise ContainerConfigError(f'couldn\'t find key {r["key"]} in Secret {self.ns}/{r["name"]}')
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                value = self._config_map(r["name"], optional=r.get("optional", False)).get(r["key"])
                if value is None and not r.get("optional", False):
                    raise ContainerConfigError(f'couldn\'t find key {r["key"]} in ConfigMap {self.ns}/{r["name"]}')
            elif "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                value = {"status.podIP": self.ip, "status.hostIP": "10.244.0.1", "spec.nodeName": NODE}.get(
                    path, _field(self.pod, path))
            elif "resourceFieldRef" in ref:
                value = _field(container.get("resources") or {}, ref["resourceFieldRef"]["resource"])
            else:
                value = None
            if value is not None:
                defined[name] = value
        env.update(defined)
        return env

    def _secret(self, name: str, optional: bool) -> dict[str, str]:
        obj = self.c.store.find("secrets", self.ns, name)
        if obj is None:
            if optional:
                return {}
            raise ContainerConfigError(f'secret "{name}" not found')
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}

    def _config_map(self, name: str, optional: bool) -> dict[str, str]:
        obj = self.c.store.find("configmaps", self.ns, name)
        if obj is None:
            if optional:
                return {}
            raise ContainerConfigError(f'configmap "{name}" not found')
        return dict(obj.get("data") or {})

    def _volumes(self, fs_group: int | None) -> dict[str, Path]:
        """Each volume of the Pod on disk, by name."""
        result: dict[str, Path] = {}
        for volume in self.pod["spec"].get("volumes") or []:
            name = volume["name"]
            path = self.dir / "volumes" / name
            if "emptyDir" in volume:
                if not path.exists():
                    path.mkdir(parents=True)
                    path.chmod(0o777)
            elif "secret" in volume or "configMap" in volume:
                kind = "secret" if "secret" in volume else "configMap"
                source = volume[kind]
                ref_name = source["secretName"] if kind == "secret" else source["name"]
                optional = bool(source.get("optional", False))
                data = self._secret(ref_name, optional) if kind == "secret" else self._config_map(ref_name, optional)
                self._write_files(path, data, source.get("items"), int(source.get("defaultMode", 0o644)), fs_group)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if self.c.store.find("persistentvolumeclaims", self.ns, claim) is None:
                    raise ContainerConfigError(f'persistentvolumeclaim "{claim}" not found')
                path = self.c.workdir / "volumes" / self.ns / claim
                if not path.exists():
                    path.mkdir(parents=True)
                    if fs_group is not None:
                        os.chown(path, 0, fs_group)
                        path.chmod(0o2775)
            elif "projected" in volume or "hostPath" in volume:
                raise images.ImageNotRunnable(f"volume {name}: projected/hostPath volumes are not rehearsed")
            else:
                raise ContainerConfigError(f"volume {name}: a kind the rehearsal does not know")
            result[name] = path
        return result

    @staticmethod
    def _write_files(path: Path, data: dict[str, str], items: list[Obj] | None, mode: int,
                     fs_group: int | None) -> None:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        path.chmod(0o755)
        wanted = items or [{"key": k, "path": k} for k in data]
        for item in wanted:
            if item["key"] not in data:
                raise ContainerConfigError(f'couldn\'t find key {item["key"]} in the volume\'s source')
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]])
            os.chown(target, 0, fs_group if fs_group is not None else 0)
            target.chmod(int(item.get("mode", mode)))

    def _token_volume(self, fs_group: int | None) -> Path | None:
        spec = self.pod["spec"]
        account = spec.get("serviceAccountName") or "default"
        sa = self.c.store.find("serviceaccounts", self.ns, account) or {}
        automount = spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True))
        if not automount:
            return None
        path = self.dir / "volumes" / "kube-api-access"
        token = self.c.tokens.issue(self.ns, account)
        self._write_files(path, {"token": token, "ca.crt": self.c.ca_file.read_text(), "namespace": self.ns},
                          None, 0o644, fs_group)
        return path

    def _start(self, container: Obj) -> Container:
        name = container["name"]
        image = images.resolve(container["image"])
        uid, gid, groups, sc = self._security(container, image)
        fs_group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
        volumes = self._volumes(fs_group)
        env = self._env(container, image, uid)
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise ContainerConfigError(f'volume "{mount["name"]}" is not declared by the Pod')
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append({"source": str(source), "target": mount["mountPath"],
                           "readonly": bool(mount.get("readOnly", False))})
        token = self._token_volume(fs_group)
        if token is not None:
            mounts.append({"source": str(token), "target": TOKEN_DIR, "readonly": True})
        command = container.get("command") or image.entrypoint
        args = container.get("args") if "args" in container else ([] if container.get("command") else image.cmd)
        argv = [_expand(a, env) for a in [*command, *args]]
        config = {
            "base": str(self.dir / "rootfs" / name), "users": image.users, "dirs": image.dirs,
            "binds": image.binds, "mounts": mounts, "hosts": str(self.hosts), "resolv": str(self.resolv),
            "readonly_root": bool(sc.get("readOnlyRootFilesystem", False)),
            "workdir": container.get("workingDir") or image.workdir, "uid": uid, "gid": gid, "groups": groups,
            "no_new_privs": sc.get("allowPrivilegeEscalation") is False, "env": env, "argv": argv,
            "tini": images.have_tini_stand_in(argv),
        }
        config_path = self.dir / f"{name}.json"
        config_path.write_text(json.dumps(config))
        config_path.chmod(0o600)
        log_path = self.dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        netns = self.c.network.pods[self.uid].namespace
        cgroups = self._cgroups(container)
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                ["sh", "-c", JOIN_CGROUPS, "sh", "nsenter", f"--net={netns}", "unshare", "--mount", "--pid", "--fork",
                 "--kill-child", sys.executable, "-m", "rehearsal.container_init", str(config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(images.ROOT),
                     "ORZ_CGROUP_PROCS": " ".join(str(g / "cgroup.procs") for g in cgroups)},
                start_new_session=True)
        self.c.logs[(self.ns, self.name, name)] = log_path
        log.info("pod %s/%s: started %s (%s)", self.ns, self.name, name, " ".join(argv))
        self.note("Started", f"Started container {name}", name)
        return Container(container, process, log_path, env, uid, gid, cgroups)

    def _cgroups(self, container: Obj) -> list[Path]:
        """The container's own cgroups (v1: memory, pids) with its limits, as the runtime makes them: its
        memory limit, and the node's per-Pod pids limit."""
        limits = {"pids.max": POD_PIDS_LIMIT}
        memory = quantity_bytes(str(((container.get("resources") or {}).get("limits") or {}).get("memory") or ""))
        if memory:
            limits["memory.limit_in_bytes"] = memory
        attempt = self.restarts.get(container["name"], 0)
        name = f"orz-rehearsal-{self.uid[:18]}-{container['name']}-{attempt}"
        sandbox_launch.remove_cgroups(name)  # a leftover of an interrupted run
        return sandbox_launch.make_cgroups(name, limits)

    # ----------------------------------------------------------------------------------- probes

    def _probe(self, running: Container) -> None:
        spec = running.spec
        now = time.monotonic()
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = spec.get(kind)
            if probe is None:
                if kind == "readinessProbe":
                    running.ready = running.started
                continue
            if kind != "startupProbe" and not running.started:
                continue
            if kind == "startupProbe" and running.started:
                continue
            due = running.probe_due.setdefault(kind, running.started_mono + int(probe.get("initialDelaySeconds", 0)))
            if now < due:
                continue
            running.probe_due[kind] = now + int(probe.get("periodSeconds", 10))
            began = time.monotonic()
            ok, why = self._run_probe(running, probe)
            took = time.monotonic() - began
            failures = 0 if ok else running.failures.get(kind, 0) + 1
            running.failures[kind] = failures
            threshold = int(probe.get("failureThreshold", 3))
            name = kind.removesuffix("Probe").capitalize()
            if not ok:
                self.note("Unhealthy", f"{name} probe failed: {why}", spec["name"], warning=True,
                          probe=kind, failures=failures, threshold=threshold, seconds=round(took, 3))
            if kind == "readinessProbe":
                was = running.ready
                running.ready = ok if ok else (running.ready and failures < threshold)
                if running.ready != was:
                    self.note("Ready" if running.ready else "NotReady",
                              f"container {spec['name']} {'ready' if running.ready else 'not ready'}"
                              + ("" if ok else f" after {failures} failed readiness probes: {why}"),
                              spec["name"], warning=not running.ready, seconds=round(took, 3))
            elif kind == "startupProbe" and ok:
                running.started = True
            elif not ok and failures >= threshold:
                log.info("pod %s/%s: %s of %s failed %s times: restarting", self.ns, self.name, kind,
                         spec["name"], failures)
                self.note("Killing", f"Container {spec['name']} failed {kind} {failures} times, will be restarted",
                          spec["name"], warning=True)
                running.signal(signal.SIGKILL)

    def _run_probe(self, running: Container, probe: Obj) -> tuple[bool, str]:
        """Whether the probe passed and, when not, why, in the kubelet's words."""
        timeout = float(probe.get("timeoutSeconds", 1))
        if "exec" in probe:
            done = running.exec(list(probe["exec"]["command"]), timeout)
            if done is None:
                return False, "the container has no process"
            output = (done.stdout + done.stderr).decode(errors="replace").strip()[-300:]
            return done.returncode == 0, f"command exited {done.returncode}: {output}"
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self._port(running.spec, get["port"])
            url = f"http://{self.ip}:{port}{get.get('path', '/')}"
            conn = http.client.HTTPConnection(self.ip, port, timeout=timeout)
            began = time.monotonic()
            connected = None
            try:
                conn.connect()
                connected = time.monotonic() - began
                conn.request("GET", get.get("path", "/"))
                reply = conn.getresponse()
                body = reply.read(300).decode(errors="replace")
            except TimeoutError:
                # Whether the connection or the answer was late tells a busy network path from a slow handler.
                stage = "connecting" if connected is None else f"awaiting the answer (connected in {connected:.3f} s)"
                return False, f'Get "{url}": timed out after {timeout:g} s (timeoutSeconds) {stage}'
            except (OSError, http.client.HTTPException) as exc:
                return False, f'Get "{url}": {type(exc).__name__}: {exc}'
            finally:
                conn.close()  # a probe that timed out or failed too: one socket per probe otherwise lingers
            if 200 <= reply.status < 400:
                return True, ""
            return False, f"HTTP probe failed with statuscode: {reply.status}: {body}"
        if "tcpSocket" in probe:
            port = self._port(running.spec, probe["tcpSocket"]["port"])
            try:
                with socket.create_connection((self.ip, port), timeout=timeout):
                    return True, ""
            except OSError as exc:
                return False, f"dial tcp {self.ip}:{port}: {type(exc).__name__}: {exc}"
        return False, "a probe of no kind the rehearsal knows"

    @staticmethod
    def _port(container: Obj, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in container.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"no container port named {port}")

    # ---------------------------------------------------------------------------------- status

    def _report(self, reason: str | None = None) -> None:
        spec = self.pod["spec"]
        statuses = []
        for container in spec["containers"]:
            name = container["name"]
            running = self.containers.get(name)
            if running is not None:
                state: Obj = {"running": {"startedAt": running.started_at}}
            elif name in self.waiting:
                state = {"waiting": self.waiting[name]}
            elif name in self.terminated:
                state = {"terminated": self.terminated[name]}
            else:
                state = {"waiting": {"reason": "ContainerCreating"}}
            statuses.append({"name": name, "image": container["image"], "imageID": "",
                             "containerID": f"rehearsal://{self.uid[:8]}-{name}",
                             "ready": bool(running and running.ready), "started": bool(running and running.started),
                             "restartCount": self.restarts.get(name, 0), "state": state,
                             **({"lastState": self.last_state[name]} if name in self.last_state else {})})
        ready = all(s["ready"] for s in statuses) and self.phase == "Running"
        conditions = [self._condition(kind, value) for kind, value in (
            ("PodScheduled", True), ("Initialized", self.initialized), ("ContainersReady", ready), ("Ready", ready))]
        status: Obj = {"phase": self.phase, "conditions": conditions, "containerStatuses": statuses,
                       "podIP": self.ip, "podIPs": [{"ip": self.ip}] if self.ip else [], "hostIP": "10.244.0.1",
                       "startTime": (self.pod.get("status") or {}).get("startTime") or now_rfc3339(),
                       "qosClass": "Burstable"}
        if self.evicted:
            status["reason"], status["message"] = "Evicted", self.evicted
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                               "message": self.evicted, "lastTransitionTime": self.transitions["Evicted"]})
        elif reason or self.skipped:
            status["reason"] = reason or "ImageNotRunnable"
            status["message"] = self.skipped or reason
        if (self.pod.get("status") or {}) == status:
            return
        with contextlib.suppress(ApiError):
            self.pod = self.c.store.replace("pods", self.ns, self.name, {**self.pod, "status": status}, "status")

    def _condition(self, kind: str, value: bool) -> Obj:
        """One Pod condition with the time it last changed (kept while it holds, as the API keeps it)."""
        status = "True" if value else "False"
        if self.transitions.get(kind, "").split("|")[0] != status:
            self.transitions[kind] = f"{status}|{now_rfc3339()}"
            if kind == "Ready":
                self.note("PodReady" if value else "PodNotReady", f"Pod condition Ready={status}", warning=not value)
        return {"type": kind, "status": status, "lastTransitionTime": self.transitions[kind].split("|")[1]}

    # ------------------------------------------------------------------------------ local storage

    def _storage_over_limit(self) -> str | None:
        """The kubelet's message for the first local storage limit this Pod is past (its checks' order:
        emptyDir sizeLimit, the Pod's total, each container's own), or None."""
        spec = self.pod["spec"]
        volumes = self.dir / "volumes"
        disk_dirs = {}
        for volume in spec.get("volumes") or []:
            empty = volume.get("emptyDir")
            if empty is None or empty.get("medium") == "Memory":
                continue  # a memory emptyDir counts against the memory limit, as tmpfs does
            used = _disk_usage(volumes / volume["name"])
            disk_dirs[volume["name"]] = used
            limit = empty.get("sizeLimit")
            if limit and used > (quantity_bytes(str(limit)) or used):
                return f'Usage of EmptyDir volume "{volume["name"]}" exceeds the limit "{limit}". '
        # A container's writable root is a tmpfs here (rehearsal.container_init), which its memory limit
        # holds; on disk it has its log.
        own = {c["name"]: _disk_usage(self.dir / "logs" / f"{c['name']}.log") for c in spec["containers"]}
        limits = {c["name"]: str(((c.get("resources") or {}).get("limits") or {}).get("ephemeral-storage") or "")
                  for c in spec["containers"]}
        total_limit = sum(quantity_bytes(limit) or 0 for limit in limits.values())
        if total_limit and sum(disk_dirs.values()) + sum(own.values()) > total_limit:
            return f"Pod ephemeral local storage usage exceeds the total limit of containers {_quantity(total_limit)}. "
        for name, limit in limits.items():
            if limit and own[name] > (quantity_bytes(limit) or own[name]):
                return f'Container {name} exceeded its local ephemeral storage limit "{limit}". '
        return None

    def _evict(self, message: str) -> None:
        """Evict the Pod as the kubelet does for a local storage limit: every container killed at once, the Pod
        kept as Failed/Evicted for its owner to see and delete."""
        log.info("pod %s/%s evicted: %s", self.ns, self.name, message)
        self.note("Evicted", message, warning=True)
        running = dict(self.containers)
        self._kill_all(grace_s=0)
        for name, container in running.items():
            state = {"exitCode": KILLED_EXIT_CODE, "reason": "Error", "startedAt": container.started_at,
                     "finishedAt": now_rfc3339()}
            self.terminated[name] = state
            self.last_state[name] = {"terminated": state}
        self.waiting.clear()
        self.evicted = message
        self.transitions["Evicted"] = now_rfc3339()
        self.phase = "Failed"
        self._report()

    # ------------------------------------------------------------------------------ termination

    def _terminate(self, grace_s: int) -> None:
        self.note("Killing", f"Stopping the Pod's containers (grace period {grace_s} s)")
        self._kill_all(grace_s)
        self.c.store.finish_pod_deletion(self.ns, self.name)

    def _kill_all(self, grace_s: int) -> None:
        running = list(self.containers.values())
        deadline = time.monotonic() + grace_s
        if grace_s > 0:
            self._pre_stop(deadline)
        for container in running:
            container.signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        for container in running:
            while container.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if container.process.poll() is None:
                container.signal(signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    container.process.wait(5)
        for container in running:
            sandbox_launch.leave_cgroups(container.cgroups)
        self.containers.clear()

    def _pre_stop(self, deadline: float) -> None:
        """Each container's preStop exec hook, in turn, before its SIGTERM and inside the grace period (as
        the kubelet runs them); a hook that fails is logged and the termination goes on."""
        for spec in self.pod["spec"].get("containers") or []:
            command = (((spec.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")
            container = self.containers.get(spec["name"])
            if not command or container is None or container.process.poll() is not None:
                continue
            done = container.exec(list(command), max(1.0, deadline - time.monotonic()))
            if done is None or done.returncode != 0:
                log.warning("pod %s/%s: preStop hook of %s failed: %s", self.ns, self.name, spec["name"],
                            "not running" if done is None else done.stderr.decode(errors="replace")[-200:])

    def _cleanup(self) -> None:
        self.c.network.detach(self.uid)
        shutil.rmtree(self.dir / "rootfs", ignore_errors=True)
        # A Pod's emptyDirs, Secret and ConfigMap files go with it (its PVCs live elsewhere and stay).
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)


class Kubelet:
    """Starts a PodWorker for every Pod the store holds; stops them all on ``stop``."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.workers: dict[str, PodWorker] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-kubelet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            seen = self.c.store.wait_for_change(seen, 0.5)
            pods, _, _ = self.c.store.list("pods", None)
            for pod in pods:
                uid = pod["metadata"]["uid"]
                if uid not in self.workers and not pod["metadata"].get("deletionTimestamp"):
                    worker = PodWorker(self.c, pod)
                    self.workers[uid] = worker
                    worker.thread.start()
                elif uid not in self.workers:
                    # Deleted before it ever ran: nothing to stop.
                    self.c.store.finish_pod_deletion(pod["metadata"]["namespace"], pod["metadata"]["name"])

    def worker(self, namespace: str, name: str) -> PodWorker | None:
        for worker in self.workers.values():
            if (worker.ns, worker.name) == (namespace, name) and worker.thread.is_alive():
                return worker
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for worker in list(self.workers.values()):
            worker.stop()
