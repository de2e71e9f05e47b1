"""Time from LocalProvider.create to the runner's first "ready" heartbeat (endpoint up, program running).

Small repo, no init, with the session sandbox on and off in the same run (``--sandbox both``), plus the
keystroke echo through each runner's endpoint (a pty, one byte out, its echo back; what the gateway's
hop to the runner costs: a unix socket into the sandbox, or loopback TCP). The baseline, measured in the
same run, is the bare minimum the runner has to do anyway: ``git clone --depth 1`` of the same repo plus
``tmux new-session`` with the same program. Heartbeats go to the tests' fake API (tests/runner/fake_api.py),
a stand-in for the internal route.

    python bench/create_to_running.py [-n 10] [--echo 500] [--sandbox both|on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
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
from api.schemas import UNIX_ROUTE_PREFIX
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


def is_ready(body: dict) -> bool:
    return bool(body.get("host_key") and body.get("program_running"))


async def one_run(provider: LocalProvider, api: FakeApi, url: str, key: str, i: int) -> float:
    sid = f"bench-{provider.settings.sandbox}-{i}"
    spec = ComputeSpec(session_id=sid, org_id="o", user_id="u", tier="small", resources={}, repo_url=url,
                       branch="main", program=PROGRAM, task=None, api_url=api.url, gateway_public_key=key,
                       heartbeat_interval_s=20, runner_token="bench-token")
    t0 = time.perf_counter()
    state = await provider.create(spec)
    try:
        await api.wait_for(is_ready, timeout=30, session_id=sid)
        return time.perf_counter() - t0
    finally:
        await provider.delete(sid, state)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def connect_runner(body: dict, key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
    """Connect as the gateway would: its client key, the runner's reported host key, TCP or unix socket."""
    host_key = asyncssh.import_public_key(body["host_key"])
    options: dict = {"username": "rw", "client_keys": [key], "known_hosts": ([host_key], [], []),
                     "config": None, "agent_path": None, "encryption_algs": ["aes128-gcm@openssh.com"]}
    if str(body["ssh_host"]).startswith(UNIX_ROUTE_PREFIX):
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, body["ssh_host"][len(UNIX_ROUTE_PREFIX):])
        return await asyncssh.connect(sock=sock, **options)
    return await asyncssh.connect(body["ssh_host"], body["ssh_port"], **options)


async def echo_latency(provider: LocalProvider, api: FakeApi, url: str, key: asyncssh.SSHKey,
                       samples: int) -> list[float]:
    """Per keystroke: write one byte to a pty on the runner's endpoint and wait for its echo."""
    sid = f"bench-{provider.settings.sandbox}-echo"
    spec = ComputeSpec(session_id=sid, org_id="o", user_id="u", tier="small", resources={}, repo_url=url,
                       branch="main", program=PROGRAM, task=None, api_url=api.url,
                       gateway_public_key=key.export_public_key().decode().strip(), heartbeat_interval_s=20,
                       runner_token="bench-token")
    state = await provider.create(spec)
    try:
        body = await api.wait_for(is_ready, timeout=30, session_id=sid)
        async with await connect_runner(body, key) as conn:
            proc = await conn.create_process("cat", term_type="xterm", encoding=None)
            out: list[float] = []
            for i in range(samples + 20):  # the first 20 warm up
                ch = bytes([97 + i % 26])
                t0 = time.perf_counter()
                proc.stdin.write(ch)
                while ch not in await proc.stdout.read(64):
                    pass
                if i >= 20:
                    out.append(time.perf_counter() - t0)
            proc.close()
            return out
    finally:
        await provider.delete(sid, state)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="runs of each (default 10)")
    parser.add_argument("--echo", type=int, default=500, help="keystrokes timed per mode (0 skips)")
    parser.add_argument("--sandbox", choices=("both", "on", "off"), default="both")
    args = parser.parse_args()
    modes = ("on", "off") if args.sandbox == "both" else (args.sandbox,)
    root = Path(tempfile.mkdtemp(prefix="orzb-", dir="/tmp"))
    api = await FakeApi(interval_s=20).start()
    runs: dict[str, list[float]] = {}
    echoes: dict[str, list[float]] = {}
    try:
        url = make_repo(root)
        gw_key = asyncssh.generate_private_key("ssh-ed25519")
        key = gw_key.export_public_key().decode().strip()
        providers = {mode: LocalProvider(Settings(data_dir=root / f"data-{mode}", log_level="WARNING",
                                                  sandbox=mode, repo_file_dirs=str(root))) for mode in modes}
        for mode, provider in providers.items():
            await one_run(provider, api, url, key, 999)  # warm-up: imports, page cache
            runs[mode] = []
        for i in range(args.n):  # interleaved, so both modes see the same machine load
            for mode, provider in providers.items():
                runs[mode].append(await one_run(provider, api, url, key, i))
        if args.echo:
            for mode, provider in providers.items():
                echoes[mode] = await echo_latency(provider, api, url, gw_key, args.echo)
        bases = [baseline(root, url, i) for i in range(args.n)]
    finally:
        await api.close()
        shutil.rmtree(root, ignore_errors=True)
    b50, b95 = statistics.median(bases), pct(bases, 95)
    for mode, values in runs.items():
        p50, p95 = statistics.median(values), pct(values, 95)
        print(f"create → ready heartbeat, local provider, sandbox {mode}, n={args.n}: "
              f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms "
              f"(target < 1500 ms: {'met' if p95 < 1.5 else 'MISSED'}); runs (ms): "
              + " ".join(f"{r * 1000:.0f}" for r in values))
    print(f"baseline git clone --depth 1 + tmux new-session: p50 {b50 * 1000:.0f} ms, p95 {b95 * 1000:.0f} ms")
    for mode, values in runs.items():
        print(f"ratio runner/baseline, sandbox {mode}: p50 {statistics.median(values) / b50:.1f}x")
    if len(runs) == 2:
        print(f"ratio sandbox on/off create → ready: p50 "
              f"{statistics.median(runs['on']) / statistics.median(runs['off']):.2f}x")
    for mode, lat in echoes.items():
        print(f"keystroke echo via the runner endpoint, sandbox {mode}, n={len(lat)}: "
              f"p50 {statistics.median(lat) * 1000:.3f} ms, p99 {pct(lat, 99) * 1000:.3f} ms")
    if len(echoes) == 2:
        ratio50 = statistics.median(echoes["on"]) / statistics.median(echoes["off"])
        ratio99 = pct(echoes["on"], 99) / pct(echoes["off"], 99)
        print(f"ratio sandbox on/off echo: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
