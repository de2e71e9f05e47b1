"""What a rehearsal or a soak on it leaves behind for whoever reads a failure later, bounded in size.

``save(cluster, dest)`` writes, for every Pod the kubelet ran (deleted ones too, which the API no longer
lists): each container's log (its tail), the Pod's last status, its history (starts, exits, probe failures
with their messages and durations, readiness changes, with millisecond times), plus the cluster's Events
and one ``timeline.txt`` of every Pod's warnings and readiness changes in time order. The rehearsal keeps
Pod logs only while the cluster is up, so this runs before it goes down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rehearsal.cluster import RehearsalCluster

ROOT = Path(__file__).resolve().parents[1]
# Where runs keep their evidence unless told otherwise; the newest KEEP_RUNS directories stay.
DEFAULT_BASE = ROOT / ".cache" / "rehearsal-artifacts"
KEEP_RUNS = 10
LOG_TAIL_BYTES = 256 * 1024  # per container: the end of its log, where a failure shows
TOTAL_BYTES = 48 * 1024 * 1024  # per run: logs beyond this are left out (and the index says so)
# Timeline lines worth a reader's eye: what went wrong and every readiness change.
TIMELINE_REASONS = {"Unhealthy", "NotReady", "Ready", "PodReady", "PodNotReady", "Exited", "BackOff", "Killing",
                    "Started"}


def run_dir(label: str, base: Path | None = None) -> Path:
    """A new directory for one run's evidence, <base>/<UTC time>-<label>; older runs beyond KEEP_RUNS go."""
    base = base or Path(os.environ.get("ORZ_REHEARSAL_ARTIFACTS") or DEFAULT_BASE)
    base.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in base.iterdir() if p.is_dir())
    for old in runs[:max(0, len(runs) - (KEEP_RUNS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    dest = base / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{label}"
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _tail(path: Path, limit: int) -> tuple[bytes, int]:
    """The last `limit` bytes of a file, and its whole size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - limit))
        return f.read(), size


def save(cluster: RehearsalCluster, dest: Path, *, log_tail: int = LOG_TAIL_BYTES, total: int = TOTAL_BYTES) -> Path:
    """Write the cluster's evidence under dest (see the module's docstring); dest."""
    dest.mkdir(parents=True, exist_ok=True)
    kubelet = cluster.kubelet
    workers = list(kubelet.workers.values()) if kubelet is not None else []
    spent = 0
    index: list[dict[str, Any]] = []
    timeline: list[tuple[float, str]] = []
    for worker in sorted(workers, key=lambda w: (w.ns, w.name, w.uid)):
        current = cluster.store.find("pods", worker.ns, worker.name)
        pod = current if current is not None and current["metadata"]["uid"] == worker.uid else worker.pod
        where = dest / worker.ns / f"{worker.name}-{worker.uid[:8]}"
        where.mkdir(parents=True, exist_ok=True)
        history = list(worker.history)
        (where / "pod.json").write_text(json.dumps(pod, indent=1, default=str))
        (where / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        entry: dict[str, Any] = {"namespace": worker.ns, "pod": worker.name, "uid": worker.uid,
                                 "deleted": current is None or current["metadata"]["uid"] != worker.uid,
                                 "dir": str(where.relative_to(dest)), "logs": {}}
        logs = worker.dir / "logs"
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            with contextlib.suppress(OSError):
                text, size = _tail(log, min(log_tail, max(0, total - spent)))
                spent += len(text)
                (where / log.name).write_bytes(text)
                entry["logs"][log.stem] = {"bytes": size, "kept": len(text)}
        index.append(entry)
        for h in history:
            if h.get("reason") in TIMELINE_REASONS:
                who = f"{worker.ns}/{worker.name}" + (f"/{h['container']}" if h.get("container") else "")
                timeline.append((float(h.get("t", 0)), f"{h.get('time')} {who} {h['reason']}: {h.get('message', '')}"))
    events, _, _ = cluster.store.list("events", None)
    (dest / "events.json").write_text(json.dumps(events, indent=1, default=str))
    (dest / "timeline.txt").write_text("".join(line + "\n" for _, line in sorted(timeline)))
    (dest / "index.json").write_text(json.dumps({"pods": index, "log_bytes_kept": spent,
                                                 "log_bytes_limit": total}, indent=1))
    return dest


def save_quietly(cluster: RehearsalCluster | None, label: str, out: Any = print) -> Path | None:
    """save() into a new run directory, saying where; a failure to save is told, never raised (the run's own
    outcome is what matters to its caller)."""
    if cluster is None or cluster.kubelet is None:
        return None
    try:
        dest = save(cluster, run_dir(label))
    except Exception as exc:  # evidence is best effort: it must not hide the failure it documents
        out(f"rehearsal: could not save the Pods' evidence: {type(exc).__name__}: {exc}")
        return None
    out(f"rehearsal: Pod logs, status history and events saved in {dest} (timeline.txt first)")
    return dest
