"""What the soak measured: service samples (RSS, fds, asyncio tasks, the SLO counters) while it runs, and
the report (markdown, JSON, PNG) at the end."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from soak_faults import RECOVERY_TARGET_S, Fault
from soak_platform import SoakPlatform, http_get, open_fds, rss_kib
from soak_users import Recorder

# The dashboard's headline indicators (charts/orzbob-cloud/dashboards/orzbob-cloud.json, row "Now"),
# computed the same way from the same counters over the soak.
SLO_NAMES = ("Attach success", "p99 attach latency", "API error ratio")
UNCOUNTED_ROUTES = ("/metrics", "/healthz", "/readyz")
TARGETS = {"ok_outside_pct": 99.9, "lost": 0, "recovery_s": RECOVERY_TARGET_S, "rss_growth_pct": 10.0}


@dataclass
class Sample:
    at: float
    service: str
    pid: int
    rss_kib: int | None
    fds: int | None
    tasks: float | None


@dataclass(eq=False)  # a Thread must stay hashable
class Sampler(threading.Thread):
    """Every few seconds: each service's RSS, fds and asyncio tasks, and the counters behind the SLOs
    (summed across restarts: a counter that went down was a new process)."""

    platform: SoakPlatform
    interval: float = 5.0
    samples: list[Sample] = field(default_factory=list)
    # (time, the machine's 1-minute load average): a starved machine reads apart from a slow platform.
    loads: list[tuple[float, float]] = field(default_factory=list)
    counters: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    _last: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[int, float]] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="sampler", daemon=True)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        with self.lock:
            self.loads.append((time.time(), os.getloadavg()[0]))
        for name, service in self.platform.services.items():
            pid = service.pid
            if pid is None:
                continue
            status, body = http_get(self.platform.metrics_url(name), timeout=3)
            tasks = None
            if status == 200:
                tasks = self._counters(name, pid, body.decode("utf-8", "replace"))
            with self.lock:
                self.samples.append(Sample(time.time(), name, pid, rss_kib(pid), open_fds(pid), tasks))

    def _counters(self, service: str, pid: int, text: str) -> float | None:
        tasks = None
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "orz_asyncio_tasks":
                    tasks = s.value
                keep = (s.name in ("orz_attaches_total", "orz_attach_latency_seconds_bucket")
                        or (s.name == "orz_http_request_duration_seconds_count"
                            and s.labels.get("route") not in UNCOUNTED_ROUTES))
                if not keep:
                    continue
                key = (service, s.name, tuple(sorted(s.labels.items())))
                with self.lock:
                    last_pid, last = self._last.get(key, (pid, 0.0))
                    delta = s.value if (last_pid != pid or s.value < last) else s.value - last
                    self._last[key] = (pid, s.value)
                    self.counters[key] = self.counters.get(key, 0.0) + delta
        return tasks

    def slo(self) -> dict[str, Any]:
        ok = err = 0.0
        buckets: dict[float, float] = {}
        api_all = api_5xx = 0.0
        for (_, name, labels), value in self.counters.items():
            lab = dict(labels)
            if name == "orz_attaches_total":
                ok += value if lab.get("result") == "ok" else 0
                err += value if lab.get("result") == "error" else 0
            elif name == "orz_attach_latency_seconds_bucket":
                le = float(lab["le"])
                buckets[le] = buckets.get(le, 0.0) + value
            elif name == "orz_http_request_duration_seconds_count":
                api_all += value
                api_5xx += value if lab.get("status", "").startswith("5") else 0
        return {
            "Attach success": None if ok + err == 0 else ok / (ok + err),
            "p99 attach latency": _histogram_quantile(0.99, buckets),
            "API error ratio": None if api_all == 0 else api_5xx / api_all,
            "attaches": {"ok": ok, "error": err}, "api_requests": {"all": api_all, "5xx": api_5xx},
        }


def _histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets (linear inside the bucket)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return None
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / max(count - prev_count, 1e-9))
        prev_bound, prev_count = bound, count
    return bounds[-1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def inside(op_start: float, op_end: float, faults: list[Fault]) -> bool:
    return any(op_start < end and op_end > start for start, end in (f.window for f in faults))


def _growth(first: int | None, last: int | None) -> float | None:
    return None if not first or last is None else round(100.0 * (last - first) / first, 1)


def leaks(samples: list[Sample], services: dict[str, Any], warmup_s: float = 10.0) -> dict[str, Any]:
    """Per service: its last incarnation's first sample after warm-up against its last sample, and the
    growth over the second half of that life. A service's first big transfer raises its memory's
    high-water mark once (CPython and asyncssh keep freed memory); a leak keeps growing, so the RSS
    target is judged on the second half."""
    out: dict[str, Any] = {}
    for name, service in services.items():
        mine = [s for s in samples if s.service == name]
        if not mine:
            continue
        last_pid = mine[-1].pid
        life = [s for s in mine if s.pid == last_pid]
        settled = [s for s in life if s.at >= life[0].at + warmup_s] or life
        first, last = settled[0], life[-1]
        middle = next(s for s in settled if s.at >= (first.at + last.at) / 2)
        out[name] = {
            "restarts": max(0, len(service.starts) - 1), "pid": last_pid, "seconds": round(last.at - first.at, 1),
            "rss_kib": [first.rss_kib, middle.rss_kib, last.rss_kib],
            "rss_growth_from_start_pct": _growth(first.rss_kib, last.rss_kib),
            "rss_growth_pct": _growth(middle.rss_kib, last.rss_kib),
            "fds": [first.fds, last.fds], "asyncio_tasks": [first.tasks, last.tasks],
        }
    return out


def machine(loads: list[tuple[float, float]], started: float, cpus: int | None = None) -> dict[str, Any]:
    """CPUs and the 1-minute load average over the run (min, median, max of the samples)."""
    values = [load for _, load in loads]
    summary = ({"min": round(min(values), 2), "median": round(statistics.median(values), 2),
                "max": round(max(values), 2)} if values else None)
    return {"cpus": cpus or os.cpu_count(), "load1": summary,
            "load1_samples": [[round(at - started, 1), round(load, 2)] for at, load in loads]}


def machine_line(m: dict[str, Any]) -> str:
    """One line for the report's head: how busy the machine was, against its CPU count."""
    load = m.get("load1")
    if not load:
        return f"Machine: {m['cpus']} CPUs; load average not sampled"
    line = (f"Machine: {m['cpus']} CPUs; load average (1 min) min {load['min']}, median {load['median']}, "
            f"max {load['max']}")
    if m["cpus"] and load["median"] > m["cpus"]:
        line += (f" — {load['median'] / m['cpus']:.1f} runnable per CPU at the median: operations waited for "
                 "a CPU, so their times are the machine's as much as the platform's")
    return line


def build(rec: Recorder, faults: list[Fault], sampler: Sampler, platform: SoakPlatform, started: float,
          ended: float, extra: dict[str, Any]) -> dict[str, Any]:
    by_name: dict[str, dict[str, Any]] = {}
    outside_n = outside_ok = 0
    for op in rec.ops:
        row = by_name.setdefault(op.name, {"n": 0, "ok": 0, "durations": [], "errors_inside": 0,
                                           "errors_outside": 0, "examples": []})
        row["n"] += 1
        row["durations"].append(op.end - op.start)
        during = inside(op.start, op.end, faults)
        if op.ok:
            row["ok"] += 1
        else:
            row["errors_inside" if during else "errors_outside"] += 1
            if len(row["examples"]) < 3:
                row["examples"].append(f"{'inside' if during else 'outside'}: {op.error}")
        if not during:
            outside_n += 1
            outside_ok += op.ok
    ops = {}
    for name, row in sorted(by_name.items()):
        ops[name] = {"n": row["n"], "ok_pct": round(100.0 * row["ok"] / row["n"], 2),
                     "p50_s": _r(percentile(row["durations"], 0.5)), "p99_s": _r(percentile(row["durations"], 0.99)),
                     "errors_inside_faults": row["errors_inside"], "errors_outside_faults": row["errors_outside"],
                     "examples": row["examples"]}
    fault_rows = [{"kind": f.kind, "at_s": round(f.start - started, 1), "detail": f.detail,
                   "recovery_s": _r(f.recovery_s), "recovered": f.recovered_at is not None,
                   "within_target": f.recovery_s is not None and f.recovery_s <= RECOVERY_TARGET_S,
                   "error": f.error} for f in faults]
    ok_outside_pct = 100.0 if outside_n == 0 else 100.0 * outside_ok / outside_n
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(ended - started, 1), "database": platform.database, **extra,
        "totals": {"ops": len(rec.ops), "ok_outside_pct": round(ok_outside_pct, 3), "ops_outside": outside_n,
                   "lost": len(rec.losses), "faults": len(faults),
                   "recovered": sum(1 for f in faults if f.recovered_at is not None)},
        "targets": TARGETS,
        "machine": machine(sampler.loads, started),
        "operations": ops,
        "lost": [asdict(loss) | {"at_s": round(loss.at - started, 1)} for loss in rec.losses],
        "faults": fault_rows,
        "leaks": leaks(sampler.samples, platform.services),
        "slo": sampler.slo(),
        "samples": {name: [[round(s.at - started, 1), s.rss_kib, s.fds, s.tasks] for s in sampler.samples
                           if s.service == name] for name in platform.services},
        "timeline": [{"name": op.name, "t": round(op.start - started, 2), "s": round(op.end - op.start, 3),
                      "ok": op.ok} for op in rec.ops],
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def last_line(report: dict[str, Any]) -> str:
    t = report["totals"]
    return (f"soak: {t['ops']} ops, {t['ok_outside_pct']:.2f}% ok outside faults, {t['lost']} lost, "
            f"{t['faults']} faults, {t['recovered']} recovered")


def verdict(report: dict[str, Any]) -> list[str]:
    """The targets this run missed (empty: all met)."""
    t, missed = report["totals"], []
    if t["lost"] > TARGETS["lost"]:
        missed.append(f"{t['lost']} lost (target 0)")
    if t["ok_outside_pct"] < TARGETS["ok_outside_pct"]:
        missed.append(f"{t['ok_outside_pct']:.2f}% ok outside faults (target {TARGETS['ok_outside_pct']}%)")
    for f in report["faults"]:
        if not f["within_target"]:
            missed.append(f"{f['kind']} recovered in {f['recovery_s']}s (target {RECOVERY_TARGET_S:.0f}s)"
                          if f["recovered"] else f"{f['kind']} not recovered: {f['error']}")
    for name, leak in report["leaks"].items():
        if (leak["rss_growth_pct"] or 0) > TARGETS["rss_growth_pct"]:
            missed.append(f"{name} RSS grew {leak['rss_growth_pct']}% over the second half of its run "
                          f"(target < {TARGETS['rss_growth_pct']}%)")
    if report.get("orphans"):
        missed.append(f"{len(report['orphans'])} orphaned process(es)/tmux/session dir(s)")
    if report.get("db_rows_left"):
        missed.append(f"session rows not deleted: {report['db_rows_left']}")
    return missed


def markdown(report: dict[str, Any], png: Path | None) -> str:
    by = ", users by port-forward" if report.get("access") == "api" else ""
    lines = [f"# Soak {report['started']} ({report['duration_s']:.0f} s, {report['database']}, "
             f"{report.get('users', '?')} users{by})", ""]
    missed = verdict(report)
    lines += ["Targets: " + ("all met" if not missed else "missed: " + "; ".join(missed)), ""]
    if "machine" in report:
        lines += [machine_line(report["machine"]), ""]
    lines += ["## Operations", "", "| operation | n | ok % | p50 s | p99 s | errors outside faults | inside |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["operations"].items():
        lines.append(f"| {name} | {row['n']} | {row['ok_pct']} | {row['p50_s']} | {row['p99_s']} | "
                     f"{row['errors_outside_faults']} | {row['errors_inside_faults']} |")
    examples = [(n, e) for n, row in report["operations"].items() for e in row["examples"]]
    if examples:
        lines += ["", "Errors (first of each operation):", ""] + [f"- {n}: {e}" for n, e in examples]
    lines += ["", "## Lost data", ""]
    lines += [f"- {x['what']} in {x['session']} at {x['at_s']} s: {x['detail']}" for x in report["lost"]] or ["none"]
    lines += ["", "## Faults", "", "| fault | at s | recovery s | within 30 s | detail |", "|---|---:|---:|---|---|"]
    for f in report["faults"]:
        lines.append(f"| {f['kind']} | {f['at_s']} | {f['recovery_s'] if f['recovered'] else 'not recovered'} | "
                     f"{'yes' if f['within_target'] else 'no'} | {f['detail'] or f['error']} |")
    lines += ["", "## Leaks (each service's last start: first sample after warm-up → end)", "",
              "| service | restarts | seconds | RSS KiB (start → middle → end) | growth % (all) | "
              "growth % (2nd half) | fds | asyncio tasks |",
              "|---|---:|---:|---|---:|---:|---|---|"]
    for name, leak in report["leaks"].items():
        lines.append(f"| {name} | {leak['restarts']} | {leak['seconds']} | "
                     f"{leak['rss_kib'][0]} → {leak['rss_kib'][1]} → {leak['rss_kib'][2]} | "
                     f"{leak['rss_growth_from_start_pct']} | {leak['rss_growth_pct']} | "
                     f"{leak['fds'][0]} → {leak['fds'][1]} | "
                     f"{leak['asyncio_tasks'][0]} → {leak['asyncio_tasks'][1]} |")
    lines += ["", f"Orphans after every session was killed: {report.get('orphans') or 'none'}",
              f"Session rows not deleted: {report.get('db_rows_left') or 'none'}", "",
              "## SLO indicators (as the Grafana dashboard computes them, over the soak)", ""]
    slo = report["slo"]
    for name in SLO_NAMES:
        value = slo.get(name)
        shown = "n/a" if value is None else (f"{value:.2f} s" if "latency" in name else f"{100 * value:.3f}%")
        lines.append(f"- {name}: {shown}")
    if png is not None:
        lines += ["", f"![latency and errors over time]({png.name})"]
    lines += ["", last_line(report)]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Latency per operation and errors per 10 s over time, faults shaded; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(3, 1))
    names = sorted({row["name"] for row in report["timeline"]})
    for name in names:
        rows = [r for r in report["timeline"] if r["name"] == name]
        top.scatter([r["t"] for r in rows], [max(r["s"], 1e-3) for r in rows], s=8, label=name)
    bad = [r for r in report["timeline"] if not r["ok"]]
    top.scatter([r["t"] for r in bad], [max(r["s"], 1e-3) for r in bad], s=40, marker="x", c="red", label="failed")
    top.set_yscale("log")
    top.set_ylabel("seconds")
    top.legend(fontsize=7, ncol=4)
    span = max([r["t"] for r in report["timeline"]] + [report["duration_s"]])
    edges = list(range(0, int(span) + 10, 10))
    counts = [sum(1 for r in bad if e <= r["t"] < e + 10) for e in edges]
    bottom.bar(edges, counts, width=9, align="edge", color="red")
    bottom.set_ylabel("errors / 10 s")
    loads = report.get("machine", {}).get("load1_samples") or []
    if loads:  # beside the errors: a starved machine explains slow operations
        load_axis = bottom.twinx()
        load_axis.plot([t for t, _ in loads], [v for _, v in loads], color="grey", linewidth=1)
        load_axis.set_ylabel("load (1 min)")
    bottom.set_xlabel("seconds since start")
    for f in report["faults"]:
        end = f["at_s"] + (f["recovery_s"] if f["recovery_s"] is not None else 120)
        for ax in (top, bottom):
            ax.axvspan(f["at_s"], end, color="orange", alpha=0.25)
        top.annotate(f["kind"], (f["at_s"], top.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: dict[str, Any], where: Path) -> tuple[Path, Path]:
    where.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    png = plot(report, where / f"soak-{stamp}.png")
    report["png"] = str(png) if png else None
    md_path, json_path = where / f"soak-{stamp}.md", where / f"soak-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown(report, png))
    return md_path, json_path
