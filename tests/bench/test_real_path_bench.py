"""bench/real_path.py runs end to end on a tiny load and reports every figure and target it names.

Its figures are not checked here (speed belongs in bench/, never in a test); this keeps the benchmark of
the path users take (OpenSSH -> gateway -> runner endpoint -> tmux) working. It needs sshd and tmux.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gateway import SSHD
from bench.real_path import TARGETS

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(SSHD).exists(), reason="sshd not installed (openssh-server)"),
              pytest.mark.skipif(not shutil.which("tmux"), reason="tmux not installed")]

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_reports_every_figure_and_target() -> None:
    try:
        # Within the test's own timeout (120 s; about 20 s alone), so that a hang shows its last phase. The
        # held sessions sit idle 1 s, not the 12 s past the gateway's idle sweeps that the figure waits for.
        out = subprocess.run([sys.executable, "-m", "bench.real_path", "--bytes", "1M", "--samples", "20",
                              "--rounds", "1", "--setup-runs", "2", "--sessions", "4", "--runner-sessions", "2",
                              "--idle-s", "1"], cwd=ROOT, capture_output=True, timeout=105, check=True)
    except subprocess.TimeoutExpired as exc:
        said = (exc.stderr or b"").decode(errors="replace")[-3000:]
        pytest.fail(f"bench.real_path did not finish in 105 s; what it last said:\n{said}")
    report = json.loads(out.stdout)
    # sshd_endpoint: the prototype of option (a); relay: socat between ssh and sshd, the floor of one more hop.
    sides = ("direct", "real", "sshd_endpoint", *(("relay",) if shutil.which("socat") else ()))
    for mode in ("tmux", "pty"):
        for side in sides:
            assert report[f"{mode}_{side}_echo_p50_ms"] > 0
    for figure in ("pane_bulk", "pty_bulk", "exec_bulk", "sftp_get", "sftp_put", "scp_get", "scp_put"):
        for side in sides:
            assert report[f"{side}_{figure}_mib_s"] > 0
    # Every target of the issue gets a verdict, from figures measured in this run.
    assert set(report["targets"]) == {key for key, _, _ in TARGETS}
    assert all(v.endswith(("pass", "MISS")) for v in report["targets"].values())
    assert set(report["sshdep_targets"]) == set(report["targets"]) - {"gateway_idle_kib_per_session"}
    if "relay" in sides:
        assert set(report["relay_targets"]) == set(report["sshdep_targets"])
    for held in ("runner_attach", "sshd_attach"):
        assert report[held]["sessions"] == 2 and report[held]["failed"] == 0
    assert report["gateway_held"]["sessions"] == 4 and report["gateway_held"]["failed"] == 0
    assert report["gateway_held"]["idle_s"] == 1


def test_alt_tree_and_python_relay_sides_report_their_echo_and_cpu() -> None:
    """--alt-tree (the real path from another checkout, here this one) and --relay-python (the floor's
    relay as one Python process) each add a side to the echo rounds, with their CPU per echo."""
    out = subprocess.run([sys.executable, "-m", "bench.real_path", "--only", "echo", "--samples", "20",
                          "--rounds", "1", "--runner-sessions", "0", "--no-sshd-endpoint", "--relay-python",
                          "--alt-tree", str(ROOT)], cwd=ROOT, capture_output=True, timeout=240, check=True)
    report = json.loads(out.stdout)
    for mode in ("tmux", "pty"):
        for side in ("direct", "real", "alt", "relay"):
            assert report[f"{mode}_{side}_echo_p50_ms"] > 0
        for process in ("gateway", "runner", "alt_gateway", "alt_runner", "relay"):
            assert report[f"{mode}_{process}_cpu_us_per_echo"] > 0
            assert 0 <= report[f"{mode}_{process}_cpu_system_share"] <= 1
    assert report["alt_tree"] == str(ROOT)
    assert set(report["alt_targets"]) == {"tmux_ratio_echo_p50", "tmux_ratio_echo_p99", "pty_ratio_echo_p50",
                                          "pty_ratio_echo_p99"}
