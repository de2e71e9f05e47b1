"""Runs tests/e2e unchanged against the FAKE API server (no cluster here), through a kubeconfig.

This proves the e2e suite's own logic and the provider's kubeconfig loading; pods are marked
Running by the fake at once. Against kind, hack/e2e-kind.sh runs the same suite for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.k8s.fake_apiserver import FakeApiServer

ROOT = Path(__file__).resolve().parents[2]


def test_e2e_suite_passes_against_the_fake_server(tmp_path: Path) -> None:
    with FakeApiServer(auto_run=True) as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{server.url}'}}}}]\n"
            "users: [{name: tester, user: {token: not-a-real-token}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: tester}}]\n"
            "current-context: fake\n"
        )
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "ORZ_E2E_NAMESPACE": "orz-sessions",
               "ORZ_E2E_TIMEOUT_S": "15"}
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never pick up in-cluster credentials here
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/e2e"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
