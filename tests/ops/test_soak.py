"""The soak harness itself (hack/soak.py), run for a few seconds: its report has the promised shape, and
a workspace file deleted behind a user's back is counted as lost (the loss detection can fail a run)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from tests.support import ROOT

NEEDS_TOOLS = pytest.mark.skipif(any(shutil.which(b) is None for b in ("ssh", "scp", "tmux", "git", "bwrap")),
                                 reason="needs ssh, scp, tmux, git and bwrap")
DASHBOARD = ROOT / "charts" / "orzbob-cloud" / "dashboards" / "orzbob-cloud.json"
LAST_LINE = re.compile(r"^soak: (\d+) ops, (\d+\.\d\d)% ok outside faults, (\d+) lost, (\d+) faults, (\d+) recovered$")


@pytest.fixture
def short_base() -> Iterator[Path]:
    """A short directory: session state dirs hold unix sockets (108 bytes at most for the path)."""
    base = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))  # nosec B108
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(600)
@NEEDS_TOOLS
def test_a_short_soak_reports_a_deliberately_lost_file(short_base: Path) -> None:
    tmp_path = short_base
    done = subprocess.run(
        [sys.executable, "hack/soak.py", "--seconds", "40", "--users", "2", "--rest-users", "1", "--web-users", "0",
         "--faults", "kill-gateway", "--sabotage", "--idle-timeout", "10", "--base", str(tmp_path / "soak")],
        cwd=ROOT, capture_output=True, text=True, timeout=540, check=False)
    out = done.stdout.strip().splitlines()
    assert out, done.stderr[-2000:]
    match = LAST_LINE.match(out[-1])
    assert match, out[-5:]
    ops, _, lost, faults, recovered = match.groups()
    assert int(lost) >= 1 and int(faults) == 1 and int(recovered) == 1
    assert done.returncode == 1  # data was lost: the run fails
    report_line = next(line for line in out if line.startswith("soak: report "))
    md = Path(report_line.split()[2])
    assert md.parent == tmp_path / "soak" / "data" / "soak"
    report = json.loads(next(md.parent.glob("*.json")).read_text())
    assert report["totals"]["ops"] == int(ops) > 0
    assert {"create", "attach", "scp", "exec", "kill", "rest-create"} <= set(report["operations"])
    for row in report["operations"].values():
        assert {"n", "ok_pct", "p50_s", "p99_s", "errors_inside_faults", "errors_outside_faults"} <= set(row)
    assert any(x["what"] == "workspace file" and "soak-data.txt" in x["detail"] for x in report["lost"])
    # Only what was taken on purpose: one session's file, nothing else anywhere.
    assert len({x["session"] for x in report["lost"]}) == 1
    assert {x["what"] for x in report["lost"]} == {"workspace file"}
    (fault,) = report["faults"]
    assert fault["kind"] == "kill-gateway" and fault["recovered"] and fault["recovery_s"] is not None
    assert set(report["leaks"]) == {"api", "gateway", "scheduler"}
    assert report["leaks"]["gateway"]["restarts"] == 1
    for leak in report["leaks"].values():
        assert leak["rss_kib"][-1] > 0 and leak["fds"][1] > 0 and leak["asyncio_tasks"][1] >= 1
        assert "rss_growth_pct" in leak and "rss_growth_from_start_pct" in leak
    assert report["orphans"] == [] and report["db_rows_left"] == {}
    assert set(report["slo"]) >= {"Attach success", "p99 attach latency", "API error ratio"}
    machine = report["machine"]
    assert machine["cpus"] == os.cpu_count()
    assert 0 <= machine["load1"]["min"] <= machine["load1"]["median"] <= machine["load1"]["max"]
    assert len(machine["load1_samples"]) >= 2
    assert f"Machine: {os.cpu_count()} CPUs; load average (1 min) min " in md.read_text()
    assert md.read_text().rstrip().splitlines()[-1] == out[-1]
    if importlib.util.find_spec("matplotlib") is not None:  # the `soak` extra (make soak installs it)
        assert report["png"] and Path(report["png"]).stat().st_size > 0


def _soak_module(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "hack"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "hack"))


def test_the_report_says_how_busy_the_machine_was() -> None:
    """A reader tells a starved machine from a slow platform: CPUs and the load average over the run."""
    soak_report = _soak_module("soak_report")
    soak_users = _soak_module("soak_users")
    platform = SimpleNamespace(database="sqlite", services={})
    sampler = soak_report.Sampler(platform)
    sampler.loads = [(100.0, 3.0), (105.0, 21.5), (110.0, 17.25), (115.0, 24.0)]
    report = soak_report.build(soak_users.Recorder(), [], sampler, platform, 100.0, 120.0, {})
    assert report["machine"]["cpus"] == os.cpu_count()
    assert report["machine"]["load1"] == {"min": 3.0, "median": 19.38, "max": 24.0}
    md = soak_report.markdown(report, None)
    assert f"Machine: {os.cpu_count()} CPUs; load average (1 min) min 3.0, median 19.38, max 24.0" in md
    starved = soak_report.machine_line({"cpus": 2, "load1": {"min": 3.0, "median": 19.38, "max": 24.0}})
    assert "9.7 runnable per CPU" in starved
    idle = soak_report.machine_line({"cpus": 2, "load1": {"min": 0.1, "median": 1.2, "max": 2.5}})
    assert "runnable per CPU" not in idle


def test_the_report_and_the_dashboard_show_the_same_indicators() -> None:
    """The dashboard's headline SLO stats are the report's SLO section, and what the report checks for
    leaks (RSS, fds, asyncio tasks per service) has a panel each."""
    sys.path.insert(0, str(ROOT / "hack"))
    try:
        import soak_report
    finally:
        sys.path.remove(str(ROOT / "hack"))
    dash = json.loads(DASHBOARD.read_text())
    headline = {p["title"].removesuffix(" (1h)") for p in dash["panels"] if p["type"] == "stat"}
    assert set(soak_report.SLO_NAMES) <= headline
    exprs = " ".join(t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p["targets"])
    for series in ("process_resident_memory_bytes", "process_open_fds", "orz_asyncio_tasks"):
        assert series in exprs
    # The report computes them from the same counters the dashboard's queries read.
    source = (ROOT / "hack" / "soak_report.py").read_text()
    for name in ("orz_attaches_total", "orz_attach_latency_seconds_bucket", "orz_http_request_duration_seconds_count"):
        assert name in source and name.removesuffix("_bucket").removesuffix("_count") in exprs
