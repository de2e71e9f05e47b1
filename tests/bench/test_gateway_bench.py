"""bench/gateway.py runs end to end on a tiny load and reports every figure its README names.

Its figures are not checked here (speed belongs in bench/, never in a test); this only keeps the
benchmark working, since nothing else runs it. It needs OpenSSH's sshd as the baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gateway import SSHD

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(SSHD).exists(), reason="sshd not installed (openssh-server)")]

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_reports_every_figure() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.gateway", "--bytes", "2M", "--samples", "30",
                          "--setup-runs", "2", "--sessions", "5"], cwd=ROOT, capture_output=True, timeout=180,
                         check=True)
    report = json.loads(out.stdout)
    for side in ("direct", "gateway", "gateway_asyncssh_path"):
        assert report[f"{side}_echo_p50_ms"] > 0 and report[f"{side}_throughput_mib_s"] > 0
    for ratio in ("ratio_echo_p50", "ratio_echo_p99", "ratio_throughput", "ratio_setup",
                  "asyncssh_path_ratio_echo_p50", "asyncssh_path_ratio_throughput"):
        assert report[ratio] > 0
    assert report["gateway_cpu_us_per_echo"] > 0
    assert report["held"]["sessions"] == 5 and report["held"]["failed"] == 0
