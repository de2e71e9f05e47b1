"""Helpers for tests that run real processes: free ports, waiting (for a server to answer, too), an `orz`
subprocess, stopping one, and
the HTTP loop of the JSON stand-ins (fake APIs) some tests serve."""

from __future__ import annotations

import asyncio
import json
import os
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
