"""POST /v1/instances/{id}/attach over HTTP: certificate, JWT, ssh line, and who may ask."""

from __future__ import annotations

import asyncssh
from cryptography.hazmat.primitives import serialization
from sanic import Sanic

from api.app import create_app
from api.credentials import jwt as attach_jwt
from api.instances.providers.fake import FakeProvider
from api.settings import Settings
from tests.conftest import make_tenant

REPO = "https://example.com/acme/widgets.git"


async def _session(app: Sanic, headers: dict[str, str]) -> str:
    _, resp = await app.asgi_client.post("/v1/instances", json={"repo_url": REPO}, headers=headers)
    assert resp.status == 201, resp.json
    return str(resp.json["id"])


async def test_attach_grants_certificate_and_token(app: Sanic, sessions, settings: Settings) -> None:
    t = await make_tenant(sessions, "acme")
    sid = await _session(app, t.headers)
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers,
                                         json={"public_key": user_key.export_public_key().decode()})
    assert resp.status == 200, resp.json
    grant = resp.json
    cert = asyncssh.import_certificate(grant["certificate"])
    assert cert.principals == [sid]
    assert cert.key.public_data == user_key.public_data
    ca_pub = asyncssh.read_public_key(settings.keys_dir / "ssh_ca.pub")
    assert cert.signing_key.public_data == ca_pub.public_data
    pub = serialization.load_pem_public_key((settings.keys_dir / "jwt_es256.pem.pub").read_bytes())
    claims = attach_jwt.verify(grant["token"], pub, session_id=sid)  # type: ignore[arg-type]
    assert claims.user_id == t.user_id == grant["user"]
    assert grant["ssh"] == f"ssh -p 2222 {sid}@127.0.0.1" and grant["ssh_port"] == 2222
    assert grant["attach_url"].endswith(f"/v1/instances/{sid}/attach?token={grant['token']}")
    assert grant["readonly"] is False


async def test_attach_token_only_and_readonly(app: Sanic, sessions) -> None:
    t = await make_tenant(sessions, "acme")
    sid = await _session(app, t.headers)
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers,
                                         json={"readonly": True})
    assert resp.status == 200 and resp.json["certificate"] is None and resp.json["readonly"] is True


async def test_attach_rejects_bad_key_and_strangers(app: Sanic, sessions) -> None:
    t = await make_tenant(sessions, "acme")
    sid = await _session(app, t.headers)
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers,
                                         json={"public_key": "ssh-ed25519 garbage"})
    assert resp.status == 422 and resp.json["code"] == "validation_failed"
    assert [e["field"] for e in resp.json["errors"]] == ["public_key"]
    other = await make_tenant(sessions, "globex")
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", headers=other.headers, json={})
    assert resp.status == 404
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", json={})
    assert resp.status == 401


async def test_attach_someone_elses_session_in_the_org_is_forbidden(app: Sanic, sessions) -> None:
    from api import admin

    t = await make_tenant(sessions, "acme")
    sid = await _session(app, t.headers)
    await admin.create_user(sessions, "peer@acme.example", "acme")
    peer_token = await admin.create_token(sessions, "peer@acme.example")
    _, resp = await app.asgi_client.post(f"/v1/instances/{sid}/attach", json={},
                                         headers={"Authorization": f"Bearer {peer_token}"})
    assert resp.status == 403 and "someone else" in resp.json["detail"]


async def test_attach_certificate_lifetime_up_to_the_admins_limit(app: Sanic, sessions, settings: Settings) -> None:
    """Automation that reads a certificate file asks for a longer one (orz cloud cert --ttl), up to
    cert_max_ttl_s; the default limit is the default lifetime, so nothing changes unless an admin says."""
    t = await make_tenant(sessions, "acme")
    sid = await _session(app, t.headers)
    public = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()

    async def ask(ttl_s: object, via: Sanic = app) -> tuple[int, dict]:
        _, resp = await via.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers,
                                             json={"public_key": public, "ttl_s": ttl_s})
        return resp.status, resp.json

    status, body = await ask(settings.cert_ttl_s + 1)
    # Refused input is a 422 naming the field, as a schema rule's refusal is (the CLI exits 2 for it).
    assert status == 422 and f"at most {settings.cert_ttl_s} s" in body["detail"], body
    assert body["code"] == "validation_failed" and [e["field"] for e in body["errors"]] == ["ttl_s"]
    status, body = await ask(60)
    assert status == 200 and lifetime(body) == 60 + 30  # 30 s backdated
    assert (await ask("600"))[0] == 422  # strictly a number

    raised = create_app(settings.model_copy(update={"cert_max_ttl_s": 3600}), provider=FakeProvider())
    status, body = await ask(3600, via=raised)
    assert status == 200 and lifetime(body) == 3600 + 30


def lifetime(grant: dict) -> int:
    cert = serialization.load_ssh_public_identity(grant["certificate"].encode())
    assert isinstance(cert, serialization.SSHCertificate)
    return cert.valid_before - cert.valid_after


async def test_attach_names_the_gateways_host_key_for_known_hosts(app: Sanic, sessions, settings: Settings) -> None:
    """The CLI pins what `host_keys` says before ssh first connects (cli/known_hosts.py). Under `orz server`
    the gateway may write its key after the API started: it is looked for again until found."""
    t = await make_tenant(sessions, "acme")
    sid = await _session(app, t.headers)

    async def host_keys(via: Sanic = app) -> list[str]:
        _, resp = await via.asgi_client.post(f"/v1/instances/{sid}/attach", headers=t.headers, json={})
        assert resp.status == 200, resp.json
        return list(resp.json["host_keys"])

    assert await host_keys() == []  # no gateway key yet: the CLI falls back to trust on first use
    key = asyncssh.generate_private_key("ssh-ed25519", comment="gw@host")
    settings.keys_dir.mkdir(parents=True, exist_ok=True)
    (settings.keys_dir / "gateway_host_ed25519.pub").write_bytes(key.export_public_key())
    line = " ".join(key.export_public_key().decode().split()[:2])
    assert await host_keys() == [line]

    # The chart hands the key over as a PEM certificate or public key; users get the OpenSSH line.
    other = asyncssh.generate_private_key("ssh-ed25519")
    pem = other.pyca_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    configured = create_app(settings.model_copy(update={"gateway_host_public_key": pem}), provider=FakeProvider())
    assert await host_keys(configured) == [" ".join(other.export_public_key().decode().split()[:2])]
