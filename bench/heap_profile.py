"""Where a process's Python heap grew since a baseline, by allocation site (tracemalloc), for held sessions.

The gateway role starts tracing once it listens (`--tracemalloc OUT`); on SIGUSR1 it writes what was
allocated since then and is still alive, grouped three ways: by the line that allocated it, by the
innermost asyncssh / gateway / api line on the way there (the owner: `connection.py:914` says more than
`dict` growth in the interpreter), and by file. Figures are per held session when the caller divides by
the number held. tracemalloc sees Python's allocators only: native memory (OpenSSL contexts, uvloop's
handles, libc's fragmentation) shows in the RSS figure and not here.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections import defaultdict
from pathlib import Path

FRAMES = 25  # deep enough to reach asyncssh's or the gateway's frame from a dict resize or a bytes join
TOP = 100
_OWNERS = ("/asyncssh/", "/gateway/", "/api/", "/bench/")
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def start() -> tracemalloc.Snapshot:
    """Start tracing; the snapshot everything later is measured against."""
    tracemalloc.start(FRAMES)
    gc.collect()
    return tracemalloc.take_snapshot()


def _site(frame: tracemalloc.Frame) -> str:
    """file:line, the file relative to site-packages, this checkout or the standard library."""
    name = frame.filename
    if "/site-packages/" in name:
        name = name.split("/site-packages/", 1)[1]
    elif name.startswith(_ROOT):
        name = name[len(_ROOT):]
    elif "/lib/python3" in name:
        name = "stdlib/" + name.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{name}:{frame.lineno}"


def _owner(trace: tracemalloc.Traceback) -> str:
    for frame in reversed(trace):  # most recent first
        if any(marker in frame.filename for marker in _OWNERS) and "/bench/heap_profile" not in frame.filename:
            return _site(frame)
    return _site(trace[-1])


def _stack(trace: tracemalloc.Traceback, depth: int = 3) -> str:
    """The allocating line, then up to `depth` asyncssh / gateway / api lines that led to it, innermost first."""
    frames = [_site(trace[-1])]
    for frame in reversed(trace[:-1]):
        if len(frames) > depth:
            break
        if any(marker in frame.filename for marker in _OWNERS):
            frames.append(_site(frame))
    return " < ".join(frames)


def grown(base: tracemalloc.Snapshot) -> dict[str, object]:
    """What was allocated since `base` and is still alive: totals and the top sites (bytes, blocks), by
    allocating line, by owner, by file, and by stack (the allocating line and the owners that led to it)."""
    gc.collect()
    now = tracemalloc.take_snapshot()
    by_line: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_owner: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_file: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_stack: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total = [0, 0]
    for diff in now.compare_to(base, "traceback"):
        if diff.size_diff <= 0:
            continue
        trace = diff.traceback
        for table, key in ((by_line, _site(trace[-1])), (by_owner, _owner(trace)),
                           (by_file, _site(trace[-1]).rsplit(":", 1)[0]), (by_stack, _stack(trace))):
            table[key][0] += diff.size_diff
            table[key][1] += diff.count_diff
        total[0] += diff.size_diff
        total[1] += diff.count_diff

    def top(table: dict[str, list[int]]) -> list[tuple[str, int, int]]:
        return sorted(((k, v[0], v[1]) for k, v in table.items()), key=lambda r: -r[1])[:TOP]

    return {"bytes": total[0], "blocks": total[1], "by_line": top(by_line), "by_owner": top(by_owner),
            "by_file": top(by_file), "by_stack": top(by_stack)}


def write(base: tracemalloc.Snapshot, out: Path) -> None:
    """`grown(base)` as JSON in `out` (written whole, then renamed: a reader never sees half of it)."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(grown(base)))
    tmp.rename(out)


def per_session(report: dict[str, object], n: int, rows: int = 100) -> dict[str, object]:
    """The report's figures per held session: bytes each, and the top rows as (site, bytes, blocks) each."""
    out: dict[str, object] = {"bytes_per_session": round(int(report["bytes"]) / n),  # type: ignore[call-overload]
                              "blocks_per_session": round(int(report["blocks"]) / n, 1)}  # type: ignore[call-overload]
    for key in ("by_owner", "by_line", "by_file", "by_stack"):
        out[key] = [(site, round(size / n), round(count / n, 1))
                    for site, size, count in report[key][:rows]]  # type: ignore[index]
    return out
