"""`orz api` with its CA and JWT keys on a read-only mount (a Kubernetes Secret volume) still attaches.

The real `orz api` process runs with ORZ_SSH_CA_KEY_FILE / ORZ_JWT_KEY_FILE in a directory it cannot
write: as root (who ignores mode bits) the directory is bind-mounted read-only in a private mount
namespace, as the kubelet mounts a Secret; otherwise mode 0555 is enough.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncssh
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from api.credentials import jwt as attach_jwt
from tests.support import free_port, orz, orz_env, stop_process, wait_until

pytestmark = pytest.mark.integration


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _read_only_prefix(keys: Path) -> list[str]:
    """argv prefix that runs a command with `keys` read-only, whoever we are."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("unshare"):
        pytest.skip("root without unshare: cannot make a read-only mount")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(keys)]


def test_attach_with_keys_on_a_read_only_mount(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    ca = ed25519.Ed25519PrivateKey.generate()  # PKCS#8 PEM: what the chart's genPrivateKey gives
    signer = ec.generate_private_key(ec.SECP256R1())  # SEC1 "EC PRIVATE KEY" PEM, likewise
    (keys / "ssh-ca-key").write_bytes(_pem(ca, serialization.PrivateFormat.PKCS8))
    (keys / "jwt-key").write_bytes(_pem(signer, serialization.PrivateFormat.TraditionalOpenSSL))
    for f in keys.iterdir():
        f.chmod(0o444)
    keys.chmod(0o555)
    port = free_port()
    env = orz_env(tmp_path / "home", ORZ_DATA_DIR=str(tmp_path / "data"),
                  ORZ_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'orz.db'}", ORZ_PROVIDER="fake",
                  ORZ_API_PORT=str(port), ORZ_RUN_SCHEDULER="false",
                  ORZ_SSH_CA_KEY_FILE=str(keys / "ssh-ca-key"), ORZ_JWT_KEY_FILE=str(keys / "jwt-key"))
    for args in (["migrate"], ["create-org", "acme"], ["create-user", "dev@acme.example", "--org", "acme"]):
        done = orz("admin", *args, env=env)
        assert done.returncode == 0, done.stderr
    token = orz("admin", "create-token", "dev@acme.example", env=env).stdout.strip()
    proc = subprocess.Popen([*_read_only_prefix(keys), sys.executable, "-m", "cli", "api"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=60, what="orz api ready")
        headers = {"Authorization": f"Bearer {token}"}
        created = httpx.post(f"{base}/v1/instances", json={"repo_url": "https://example.com/a/b.git"},
                             headers=headers, timeout=10)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        user_key = asyncssh.generate_private_key("ssh-ed25519")
        grant = httpx.post(f"{base}/v1/instances/{sid}/attach", headers=headers, timeout=10,
                           json={"public_key": user_key.export_public_key().decode()})
        assert grant.status_code == 200, grant.text
        cert = asyncssh.import_certificate(grant.json()["certificate"])
        ca_pub = ca.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert cert.signing_key.public_data == asyncssh.import_public_key(ca_pub).public_data
        claims = attach_jwt.verify(grant.json()["token"], signer.public_key(), session_id=sid)
        assert claims.session_id == sid
    finally:
        _out, err = stop_process(proc)
    assert sorted(p.name for p in keys.iterdir()) == ["jwt-key", "ssh-ca-key"]
    assert "Read-only file system" not in err
