"""Time from LocalProvider.create to the runner's first "ready" heartbeat (endpoint up, program running).

Small repo, no init. The baseline, measured in the same run, is the bare minimum the runner has to do
anyway: ``git clone --depth 1`` of the same repo plus ``tmux new-session`` with the same program.
Heartbeats go to the tests' fake API (tests/runner/fake_api.py), a stand-in for the internal route.

    python bench/create_to_running.py [-n 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.instances.providers.base import ComputeSpec
from api.instances.providers.local import LocalProvider
from api.settings import Settings
from tests.runner.fake_api import FakeApi

PROGRAM = "bash -c 'echo hi; sleep infinity'"
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com",
           "GIT_CONFIG_GLOBAL": "/dev/null"}


def make_repo(root: Path) -> str:
    bare, src = root / "repo.git", root / "src"
    for args in (["init", "-q", "--bare", "-b", "main", str(bare)], ["init", "-q", "-b", "main", str(src)]):
        subprocess.run(["git", *args], check=True, env=GIT_ENV)
    (src / "README.md").write_text("# bench\n" + "x" * 2000)
    (src / ".orz").mkdir()
    (src / ".orz" / "cloud.yaml").write_text('version: "1.0"\n')
    for args in (["add", "-A"], ["commit", "-qm", "init"], ["push", "-q", str(bare), "main"]):
        subprocess.run(["git", *args], check=True, cwd=src, env=GIT_ENV)
    return f"file://{bare}"


def baseline(root: Path, url: str, i: int) -> float:
    dest, sock = root / f"base{i}", root / f"b{i}.sock"
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", "main", "--", url, str(dest)],
                   check=True)
    subprocess.run(["tmux", "-S", str(sock), "-f", "/dev/null", "new-session", "-d", "-s", "main", "-c",
                    str(dest), "--", "bash", "-c", "echo hi; sleep infinity"], check=True)
    elapsed = time.perf_counter() - t0
    subprocess.run(["tmux", "-S", str(sock), "kill-server"], check=False)
    shutil.rmtree(dest, ignore_errors=True)
    return elapsed


async def one_run(provider: LocalProvider, api: FakeApi, url: str, key: str, i: int) -> float:
    sid = f"bench-{i}"
    spec = ComputeSpec(session_id=sid, org_id="o", user_id="u", tier="small", resources={}, repo_url=url,
                       branch="main", program=PROGRAM, task=None, api_url=api.url, gateway_public_key=key,
                       heartbeat_interval_s=20, runner_token="bench-token")
    t0 = time.perf_counter()
    state = await provider.create(spec)
    try:
        await api.wait_for(lambda b: bool(b.get("ssh_port") and b.get("program_running")), timeout=30,
                           session_id=sid)
        return time.perf_counter() - t0
    finally:
        await provider.delete(sid, state)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs of each (default 10)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="orzb-", dir="/tmp"))
    api = await FakeApi(interval_s=20).start()
    provider = LocalProvider(Settings(data_dir=root / "data", log_level="WARNING"))
    try:
        url = make_repo(root)
        key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        await one_run(provider, api, url, key, 999)  # warm-up: imports, page cache
        runs = [await one_run(provider, api, url, key, i) for i in range(args.n)]
        print("runs (ms):", " ".join(f"{r * 1000:.0f}" for r in runs))
        bases = [baseline(root, url, i) for i in range(args.n)]
    finally:
        await api.close()
        shutil.rmtree(root, ignore_errors=True)
    p50, p95 = statistics.median(runs), pct(runs, 95)
    b50, b95 = statistics.median(bases), pct(bases, 95)
    print(f"create → ready heartbeat, local provider, n={args.n}: "
          f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
          f"(target < 1500 ms: {'met' if p95 < 1.5 else 'MISSED'})")
    print(f"baseline git clone --depth 1 + tmux new-session:   "
          f"p50 {b50 * 1000:.0f} ms, p95 {b95 * 1000:.0f} ms")
    print(f"ratio runner/baseline: p50 {p50 / b50:.1f}x, p95 {p95 / b95:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
