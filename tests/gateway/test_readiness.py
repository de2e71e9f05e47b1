"""The gateway is Ready only with its trust anchors loaded, reads them in every form they come in, and
counts an attach it cannot check as a failure of ours (the attach SLO), not as the user's bad credential."""

from __future__ import annotations

import datetime
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from api.settings import Settings
from gateway import metrics
from gateway.server import serve
from tests.gateway.conftest import gateway_env
from tests.support import free_port

pytestmark = pytest.mark.integration

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def self_signed(key: PrivateKey) -> bytes:
    """A certificate wrapping the key's public half, as the chart's genSelfSignedCertWithKey makes one."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orz")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=3650)))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return cert.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def public_form(key: PrivateKey, form: str) -> bytes:
    pub = key.public_key()
    if form == "openssh":
        return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" c\n"
    if form == "pem":
        return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return self_signed(key)


def attach_errors(door: str = "ssh") -> float:
    return metrics.REGISTRY.get_sample_value("orz_attaches_total", {"door": door, "result": "error"}) or 0.0


def invalid_credentials() -> float:
    return sum(metrics.REGISTRY.get_sample_value("orz_auth_failures_total", {"method": m, "reason": "invalid"})
               or 0.0 for m in ("certificate", "jwt", "websocket"))


@pytest.mark.parametrize("form", ["openssh", "pem", "certificate"])
async def test_readyz_is_503_until_the_trust_anchors_load(tmp_path: Path, form: str, caplog) -> None:
    """/readyz answers anyone: it names the anchor that is missing, not where the gateway looks for it (the
    log does)."""
    ca_pub, jwt_pub = tmp_path / "anchors" / "ca", tmp_path / "anchors" / "jwt"
    settings = Settings(data_dir=tmp_path / "data", ssh_port=0, gateway_web_port=0,
                        ssh_ca_public_key_file=ca_pub, jwt_public_key_file=jwt_pub)
    async with serve(settings) as gw, httpx.AsyncClient() as http:
        assert gw.web is not None
        base = f"http://127.0.0.1:{gw.web.port}"
        assert (await http.get(f"{base}/healthz")).status_code == 200  # alive all along
        resp = await http.get(f"{base}/readyz")
        assert resp.status_code == 503
        assert resp.text == "not ready: trust anchors not loaded: the SSH CA public key is missing\n", resp.text
        assert str(tmp_path) not in resp.text and str(ca_pub) in caplog.text
        ca_pub.parent.mkdir()
        ca, signer = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
        ca_pub.write_bytes(public_form(ca, form))
        resp = await http.get(f"{base}/readyz")
        assert resp.status_code == 503 and "the JWT public key is missing" in resp.text
        assert str(tmp_path) not in resp.text and str(jwt_pub) in caplog.text
        jwt_pub.write_bytes(public_form(signer, form))
        resp = await http.get(f"{base}/readyz")
        assert (resp.status_code, resp.text) == (200, "ok\n")
        ca_line = ca.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert gw.anchors.ca_key.export_public_key().split()[:2] == ca_line.split()
        assert gw.anchors.jwt_public_key == signer.public_key()


async def test_a_wrong_key_is_a_readable_reason(tmp_path: Path) -> None:
    ca_pub, jwt_pub = tmp_path / "ca", tmp_path / "jwt"
    ed = ed25519.Ed25519PrivateKey.generate()
    ca_pub.write_bytes(public_form(ed, "pem"))
    jwt_pub.write_bytes(public_form(ed, "pem"))  # an Ed25519 key where the ES256 key belongs
    settings = Settings(data_dir=tmp_path / "data", ssh_port=0, gateway_web_port=0,
                        ssh_ca_public_key_file=ca_pub, jwt_public_key_file=jwt_pub)
    async with serve(settings) as gw, httpx.AsyncClient() as http:
        assert gw.web is not None
        resp = await http.get(f"http://127.0.0.1:{gw.web.port}/readyz")
        assert resp.status_code == 503 and "the JWT public key is not a P-256 EC public key" in resp.text
        assert "BEGIN" not in resp.text and len(resp.text.splitlines()) == 1
        assert str(tmp_path) not in resp.text


async def test_attach_without_anchors_is_our_failure_not_the_users(tmp_path: Path) -> None:
    async with gateway_env(tmp_path, ssh_ca_public_key_file=tmp_path / "missing-ca.pub") as env:
        errors, invalid = attach_errors(), invalid_credentials()
        result = await env.ssh(*env.cert_args(), "--", "true")
        assert result.returncode != 0
        assert b"Orzbob Cloud cannot verify credentials right now" in result.stderr
        assert attach_errors() == errors + 1  # once per connection, whatever it offered
        assert invalid_credentials() == invalid
        assert not env.api.authorize_calls  # nothing reached the API
        # The same through the web door: 503, counted as ours.
        web_errors = attach_errors("web")
        async with httpx.AsyncClient() as http:
            assert env.gateway.web is not None
            resp = await http.get(f"http://127.0.0.1:{env.gateway.web.port}/v1/instances/demo-1/attach",
                                  params={"token": env.token()},
                                  headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                           "Sec-WebSocket-Version": "13"})
        assert resp.status_code == 503 and "cannot verify credentials right now" in resp.text
        assert attach_errors("web") == web_errors + 1


async def test_gateway_calls_the_api_on_its_internal_url(tmp_path: Path) -> None:
    # The public URL answers nothing (a closed port): authorize and attach events go the internal way.
    closed = f"http://127.0.0.1:{free_port()}"
    async with gateway_env(tmp_path, public_api_url=closed) as env:
        assert env.settings.internal_api_url == env.api.url != env.settings.public_api_url
        result = await env.ssh(*env.cert_args(), "--", "echo inside")
        assert (result.returncode, result.stdout) == (0, b"inside\n"), result
        assert env.api.authorize_calls and env.api.events[0]["event"] == "attached"
