"""`orz api --workers N`: N API processes accepting on one listening socket, and one metrics listener whose
answer sums them all.

The API keeps nothing a second process must see: sign-in rate limits, failed-authentication budgets and
sessions live in the database (the chart runs several replicas anyway), and the caches (tokens for
`ORZ_AUTH_CACHE_TTL_S`, identity providers' metadata) are per process as they are per replica. The local
provider is the exception: a runner is the child of the process that started it and sandbox uids are
picked in-process, so several workers are refused with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from api.serve import listen
from api.settings import Settings
from cli.errors import CliError

log = logging.getLogger("cli.api_workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client (api/metrics.py) when it is imported
STOP_GRACE_S = 30.0  # workers finishing their requests after SIGTERM, before SIGKILL


def refuse_unless_sound(settings: Settings) -> None:
    if settings.provider == "local":
        raise CliError(f"--workers {settings.api_workers} (ORZ_API_WORKERS) needs ORZ_PROVIDER=kubernetes: a "
                       "local session's runner is the child of the API process that started it, and its sandbox "
                       "uid is picked in that process (run one worker, or more replicas)")


def metrics_dir() -> tuple[Path, bool]:
    """The directory the workers share their metric values in, emptied; and whether it is ours to remove."""
    given = os.environ.get(MULTIPROC_ENV)
    if not given:
        return Path(tempfile.mkdtemp(prefix="orz-api-metrics-")), True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    # Values of an earlier run's workers would be summed with ours.
    for stale in path.glob("*.db"):
        stale.unlink()
    return path, False


def supervise(settings: Settings) -> None:
    """Run settings.api_workers workers until SIGTERM/SIGINT (passed on to them) or until one of them exits,
    which stops the rest: the container's restart policy starts a whole set again."""
    refuse_unless_sound(settings)
    shared, ours = metrics_dir()
    api_sock = listen(settings.api_host, settings.api_port)
    metrics_sock = listen(settings.api_host, settings.api_metrics_port) if settings.api_metrics_port else None
    env = {**os.environ, MULTIPROC_ENV: str(shared)}
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(settings.api_workers):
            workers.append(_spawn(api_sock, metrics_sock if index == 0 else None, env))
        where = f"http://{settings.api_host}:{api_sock.getsockname()[1]}"
        metrics_at = f"; metrics of all of them on port {metrics_sock.getsockname()[1]}" if metrics_sock else ""
        log.info("API on %s: %d workers (pids %s)%s", where, len(workers), " ".join(str(w.pid) for w in workers),
                 metrics_at)
        gone = None
        while not stopping and gone is None:
            time.sleep(0.2)
            gone = next((w for w in workers if w.poll() is not None), None)
        if gone is not None and not stopping:
            log.error("API worker %d exited with code %s; stopping the others", gone.pid, gone.returncode)
        _stop(workers)
        if gone is not None and not stopping:
            raise CliError(f"API worker {gone.pid} exited with code {gone.returncode} (its log says why)")
    finally:
        _stop(workers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        api_sock.close()
        if metrics_sock is not None:
            metrics_sock.close()
        _forget(workers, shared)
        if ours:
            shutil.rmtree(shared, ignore_errors=True)


def _spawn(api_sock: socket.socket, metrics_sock: socket.socket | None,
           env: dict[str, str]) -> subprocess.Popen[bytes]:
    """One worker: a fresh interpreter (prometheus-client reads the shared directory when first imported)
    serving the inherited listening socket(s)."""
    argv = [sys.executable, "-m", "cli", "api", "--worker-socket", str(api_sock.fileno())]
    fds = [api_sock.fileno()]
    if metrics_sock is not None:
        argv += ["--worker-metrics-socket", str(metrics_sock.fileno())]
        fds.append(metrics_sock.fileno())
    return subprocess.Popen(argv, env=env, pass_fds=fds)


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _forget(workers: list[subprocess.Popen[bytes]], shared: Path) -> None:
    """A stopped worker's live gauges leave the sums (its counters stay: they only ever add up)."""
    from prometheus_client import multiprocess

    for worker in workers:
        multiprocess.mark_process_dead(worker.pid, str(shared))
