"""Helpers for tests that run real processes: free ports, waiting (for a server to answer, too), an `orz`
subprocess, stopping one, and
the HTTP loop of the JSON stand-ins (fake APIs) some tests serve."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


# free_port() hands out ports below the kernel's ephemeral range (where port-0 binds and outgoing
# connections take theirs), each pytest-xdist worker from its own slice, never the same one twice in a
# process: workers running at once cannot be handed one port, and no server's port-0 bind can take it.
_PORTS_LOW, _PORTS_HIGH = 10000, 32000
_handed: set[int] = set()
_cursor: dict[str, int] = {}


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_slice() -> range:
    """This process's ports: its xdist worker's share of [10000, min(32000, ephemeral start))."""
    high = min(_PORTS_HIGH, _ephemeral_low())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
    size = (high - _PORTS_LOW) // count
    if size < 64:  # an ephemeral range starting below ~10000 leaves no room: the kernel's own choice
        return range(0)
    start = _PORTS_LOW + index * size
    return range(start, start + size)


def _bindable(port: int) -> bool:
    """Nothing bound to it on any IPv4 address (a listener, a connection, one in TIME_WAIT)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # nosec B104: a probe, closed at once; never listens
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nothing uses now, and that no other test (in any xdist worker) is handed."""
    ports = _worker_slice()
    if not ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    # Start at a random place in the slice: a process that inherited the worker's environment (a test that
    # runs pytest, say) does not walk the same ports in the same order.
    at = _cursor.setdefault("next", random.randrange(len(ports)))  # nosec B311: not a secret
    for step in range(len(ports)):
        port = ports[(at + step) % len(ports)]
        if port not in _handed and _bindable(port):
            _handed.add(port)
            _cursor["next"] = (at + step + 1) % len(ports)
            return port
    raise RuntimeError(f"no free port left in {ports} (handed out {len(_handed)})")


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_http(proc: subprocess.Popen[Any], *urls: str, what: str, timeout: float = 60,
                  interval: float = 0.05, exited: Callable[[], str] | None = None) -> None:
    """Wait until every URL answers 200. If ``proc`` (the server behind them) exits first, fail at once
    with ``exited()``: where to read why (by default, its exit status)."""

    def answering() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(exited() if exited else f"{what} exited with status {proc.returncode}")
        try:
            return all(httpx.get(url, timeout=1).status_code == 200 for url in urls)
        except httpx.HTTPError:
            return False

    wait_until(answering, timeout=timeout, interval=interval, what=what)


def orz_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for an `orz` subprocess with its own HOME and config dir."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        "ORZ_LOG_JSON": "true",
        # Test repositories are bare repos under /tmp (see tests/conftest.py).
        "ORZ_REPO_FILE_DIRS": os.environ.get("ORZ_REPO_FILE_DIRS", "/tmp"),  # nosec B108
    }
    env.update(extra)
    return env


def orz(*args: str, env: dict[str, str], timeout: float = 60, check: bool = False,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check, input=input_text, cwd=ROOT)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGINT, timeout: float = 30) -> tuple[Any, Any]:
    """Ask a service process to stop (SIGINT, like Ctrl-C) and collect its output (None where it was not
    piped); kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def kill_processes_under(path: Path) -> list[int]:
    """SIGKILL every process whose command line names ``path`` (or a path under it), but never this test
    process; the pids killed. What a service killed without its own clean-up (a server past its stop time
    out) leaves behind: its sessions' launchers, bwrap, slirp4netns, runners and tmux, each in a session of
    its own, outside the service's process group."""
    marker = str(path).encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile, or not ours to read
    return killed


JsonRoute = Callable[[str, str, dict[str, str], bytes], tuple[int, Any]]


async def serve_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     route: JsonRoute) -> None:
    """Answer one keep-alive HTTP/1.1 connection of a stand-in: each request to ``route``, JSON back
    (problem+json for 4xx/5xx, no body for None; a 3xx's payload names its ``location``). Returns when
    the client goes away."""
    try:
        while True:
            request_line = await reader.readline()
            if not request_line:
                return
            method, path, _ = request_line.decode().split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status, payload = route(method, path, headers, body)
            data = b"" if payload is None else json.dumps(payload).encode()
            ctype = "application/problem+json" if status >= 400 else "application/json"
            # A redirect's target: {"location": url} as the payload of a 3xx.
            location = f"location: {payload['location']}\r\n" if 300 <= status < 400 else ""
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\n{location}"
                         f"content-length: {len(data)}\r\n\r\n".encode() + data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
