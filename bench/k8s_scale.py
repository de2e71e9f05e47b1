"""The scheduler at scale on Kubernetes: `python -m bench.k8s_scale --sessions N [--json]`.

A stand-in API server (rehearsal.apiserver, in a process of its own) holds N sessions as the
KubernetesProvider makes them (a root ConfigMap each; every other session also has a Running Pod, the
rest are stopped with their workspace kept), and a SQLite database holds their N rows (seeded by a third
process). This process is the scheduler: the provider's watch caches and the reconciler, as in `orz
scheduler`. It prints:

- `cold_reconcile_s`: the first pass, which lists every Pod and root ConfigMap (in pages) to fill the caches;
- `reconcile_s`: a pass in the steady state (the number the issue's 2 s target is about);
- `api_calls_cold` / `api_calls_per_reconcile`: requests to the API server in each (steady: nothing
  changed, so O(changes) means 0);
- `rss_mib` (peak resident memory of this process) and `cache_mib` (what the filled caches added: what
  each API replica pays for its Pod cache, roughly half of it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAMESPACE = "orz-sessions"


def _mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _spec(index: int) -> Any:
    from api.instances.providers.base import ComputeSpec

    return ComputeSpec(session_id=f"s{index:07d}", org_id="org-bench", user_id="user-bench", tier="small",
                       resources={"cpu": "1", "memory": "2Gi"}, repo_url="https://example.com/r.git", branch="main",
                       program="bash", task=None, api_url="http://api:8080",
                       gateway_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench", heartbeat_interval_s=20,
                       runner_token="orzr_" + "x" * 40)


def serve(sessions: int, port_file: Path) -> None:
    """The API server process: N sessions' objects, then serve until killed."""
    from api.instances.providers.kubernetes import manifests
    from api.settings import Settings
    from rehearsal.apiserver import FakeApiServer
    from rehearsal.store import Store

    config = manifests.ClusterConfig.from_settings(Settings(k8s_namespace=NAMESPACE))
    store = Store(validate=False, pod_termination_s=None)
    for index in range(sessions):
        spec = _spec(index)
        root = store.create("configmaps", NAMESPACE, manifests.root_config_map(spec, config))
        if index % 2:
            continue  # stopped: the workspace is kept, no Pod
        pod = store.create("pods", NAMESPACE, manifests.build(spec, config, owner_uid=root["metadata"]["uid"]).pod)
        started = "2026-12-05T10:00:00Z"
        store.replace("pods", NAMESPACE, pod["metadata"]["name"], {**pod, "status": {
            "phase": "Running", "podIP": f"10.244.{index // 250 % 250}.{index % 250 + 2}", "hostIP": "10.0.0.2",
            "startTime": started, "qosClass": "Burstable",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                     "PodScheduled")],
            "containerStatuses": [{"name": "runner", "ready": True, "started": True, "restartCount": 0,
                                   "image": config.runner_image, "imageID": "sha256:" + "0" * 64,
                                   "containerID": "containerd://" + "1" * 64,
                                   "state": {"running": {"startedAt": started}}, "lastState": {}}]}}, "status")
    store.events.clear()  # a watch from "now" has nothing to replay
    with FakeApiServer(store=store) as server:
        port_file.write_text(server.url)
        while True:
            time.sleep(3600)


def seed(database_url: str, sessions: int) -> None:
    """The database process: N session rows matching the API server's objects."""
    from sqlalchemy import insert

    from api import admin
    from api.db import migrate
    from api.db.base import utcnow
    from api.db.engine import create_engine, session_factory
    from api.db.models import Instance

    migrate.upgrade(database_url)

    async def fill() -> None:
        engine = create_engine(database_url)
        db_sessions = session_factory(engine)
        org = await admin.create_org(db_sessions, "bench", "team")
        user = await admin.create_user(db_sessions, "bench@example.com", "bench")
        now = utcnow()
        async with db_sessions() as db:
            for start in range(0, sessions, 1000):
                rows = []
                for index in range(start, min(start + 1000, sessions)):
                    sid = f"s{index:07d}"
                    running = index % 2 == 0
                    rows.append({"id": sid, "org_id": getattr(org, "id", org), "user_id": getattr(user, "id", user),
                                 "state": "running" if running else "stopped", "tier": "small",
                                 "provider": "kubernetes", "spec": {}, "attached_clients": 0,
                                 "provider_state": {"namespace": NAMESPACE, "pod": sid, "root": sid,
                                                    "stopped": not running},
                                 "created_at": now, "updated_at": now, "state_changed_at": now})
                await db.execute(insert(Instance), rows)
            await db.commit()
        await engine.dispose()

    asyncio.run(fill())


async def measure(database_url: str, api_url: str) -> dict[str, float]:
    from kubernetes import client as k8s

    from api.db.engine import create_engine, session_factory
    from api.instances.providers.kubernetes.provider import KubernetesProvider
    from api.instances.service import InstanceService
    from api.jobs.reconcile import Reconciler
    from api.settings import Settings

    settings = Settings(database_url=database_url, provider="kubernetes", k8s_namespace=NAMESPACE)
    api_client = k8s.ApiClient(k8s.Configuration(host=api_url))
    calls = 0
    request = api_client.rest_client.request

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return request(*args, **kwargs)

    api_client.rest_client.request = counted  # type: ignore[method-assign]
    engine = create_engine(database_url)
    provider = KubernetesProvider(settings, api_client, sync_timeout_s=600)
    reconciler = Reconciler(InstanceService(settings, session_factory(engine), provider), settings)
    gc.collect()
    before = _mib("VmRSS")
    started = time.perf_counter()
    cold = await reconciler.run_once()
    cold_s, cold_calls = time.perf_counter() - started, calls
    gc.collect()
    cache_mib = _mib("VmRSS") - before
    calls = 0
    started = time.perf_counter()
    steady = await reconciler.run_once()
    steady_s = time.perf_counter() - started
    problems = {k: len(v) for k, v in vars(cold).items() if v} | {k: len(v) for k, v in vars(steady).items() if v}
    await provider.close()
    await engine.dispose()
    return {"cold_reconcile_s": round(cold_s, 2), "reconcile_s": round(steady_s, 2),
            "api_calls_cold": cold_calls, "api_calls_per_reconcile": calls,
            "rss_mib": round(_mib("VmHWM"), 1), "cache_mib": round(cache_mib, 1),
            "actions": problems}  # type: ignore[dict-item]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.sessions, args.serve)
        return 0
    if args.seed:
        seed(args.seed, args.sessions)
        return 0
    with tempfile.TemporaryDirectory(prefix="orz-k8s-scale-") as tmp:
        database_url = f"sqlite+aiosqlite:///{tmp}/orz.db"
        port_file = Path(tmp) / "api-url"
        server = subprocess.Popen([sys.executable, "-m", "bench.k8s_scale", "--sessions", str(args.sessions),
                                   "--serve", str(port_file)], cwd=Path(__file__).resolve().parent.parent)
        try:
            subprocess.run([sys.executable, "-m", "bench.k8s_scale", "--sessions", str(args.sessions), "--seed",
                            database_url], check=True, cwd=Path(__file__).resolve().parent.parent)
            # Making the objects takes the stand-in a while (about a minute per 20,000 sessions here).
            deadline = time.monotonic() + max(600, args.sessions * 0.06)
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("k8s_scale: the API server process did not start")
                time.sleep(0.2)
            result = {"sessions": args.sessions, **asyncio.run(measure(database_url, port_file.read_text()))}
        finally:
            server.terminate()
            server.wait(10)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
