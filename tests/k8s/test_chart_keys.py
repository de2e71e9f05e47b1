"""The keys the chart generates work in the real code: the gateway Pod's mounts and env give a Ready
gateway that accepts the API's certificates and tokens, and runners trust the gateway-public-key value.

Rendered with the real helm; the Secret's values are written where the Deployments mount them.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, cast

import asyncssh
import httpx
import pytest

from api.credentials import jwt as attach_jwt
from api.credentials import ssh_ca
from api.gateway_keys import gateway_host_public_key, gateway_public_key
from api.public_keys import to_openssh_line
from gateway import auth
from gateway.server import serve
from runner.activity import Activity
from runner.sshd import Endpoint, SessionHooks
from tests.k8s.chart_pod import container_env, rendered_secret, settings_from
from tests.k8s.helm import gitops_keys_secret, gitops_values, render

SID = "brave-otter-42"


@pytest.fixture(scope="module", params=["generated", "gitops"])
def objs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The chart's own keys, and those of hack/gitops-keys-secret.sh given as values (nothing generated)."""
    if request.param == "gitops":
        return render(*gitops_values(gitops_keys_secret(), tmp_path_factory.mktemp("keys")))
    return render()


def test_public_halves_are_derived_from_the_private_keys(objs: list[dict[str, Any]]) -> None:
    secret = rendered_secret(objs)
    for pub, priv in (("ssh-ca-public-key", "ssh-ca-key"), ("jwt-public-key", "jwt-key"),
                      ("gateway-public-key", "gateway-client-key"), ("gateway-host-public-key", "gateway-host-key")):
        derived = asyncssh.import_private_key(secret[priv]).export_public_key().split()[:2]
        assert to_openssh_line(secret[pub]).encode().split() == derived, pub


async def test_gateway_pod_is_ready_and_trusts_the_apis_credentials(objs: list[dict[str, Any]],
                                                                   tmp_path: Path) -> None:
    gw_env = container_env(objs, "gateway", tmp_path / "gateway")
    mounted = {p.name for p in (tmp_path / "gateway" / "keys").iterdir()}
    assert not mounted & {"ssh-ca-key", "jwt-key"}, "the gateway must never get a private CA/JWT key"
    settings = settings_from(gw_env, data_dir=tmp_path / "gw-data", ssh_host="127.0.0.1", ssh_port=0,
                             gateway_web_host="127.0.0.1", gateway_web_port=0, gateway_metrics_port=0)
    api_env = container_env(objs, "api", tmp_path / "api")
    api_settings = settings_from(api_env, data_dir=tmp_path / "api-data")
    async with serve(settings) as gw, httpx.AsyncClient() as http:
        assert gw.web is not None
        resp = await http.get(f"http://127.0.0.1:{gw.web.port}/readyz")
        assert (resp.status_code, resp.text) == (200, "ok\n")
        user = asyncssh.generate_private_key("ssh-ed25519")
        signed = ssh_ca.sign_user_certificate(ssh_ca.load_or_create_ca(api_settings),
                                              user.export_public_key().decode(), session_id=SID,
                                              user_id="usr_1", ttl_s=60)
        blob = asyncssh.import_certificate(signed.text).public_data
        assert auth.check_certificate(blob, SID, gw.anchors).user_id == "usr_1"
        token = attach_jwt.issue(attach_jwt.load_or_create_signing_key(api_settings), user_id="usr_1",
                                 session_id=SID, ttl_s=60)
        assert auth.check_jwt(token.token, SID, gw.anchors).jti == token.jti
        # The host key the API hands the CLI to pin is the one this gateway Pod proves itself with.
        served = await asyncssh.get_server_host_key("127.0.0.1", gw.port)
        assert served is not None
        assert gateway_host_public_key(api_settings).split() == served.export_public_key().decode().split()[:2]
    assert sorted(p.name for p in (tmp_path / "api" / "keys").iterdir()) == ["jwt-key", "secrets-key",
                                                                             "ssh-ca-key"]


async def test_runner_accepts_the_gateway_with_the_charts_public_key(objs: list[dict[str, Any]],
                                                                      tmp_path: Path) -> None:
    api_settings = settings_from(container_env(objs, "api", tmp_path / "api"), data_dir=tmp_path / "data")
    line = gateway_public_key(api_settings)  # what goes into every RunnerSpec
    assert line.startswith("ssh-ed25519 ")
    # Only authentication runs here (no channel is opened), so the hooks need nothing but `activity`.
    hooks = cast(SessionHooks, types.SimpleNamespace(activity=Activity()))
    endpoint = Endpoint(hooks, line, "127.0.0.1", 0)
    port = await endpoint.start()
    client_key = asyncssh.import_private_key(rendered_secret(objs)["gateway-client-key"])
    try:
        async with asyncssh.connect("127.0.0.1", port, username="rw", client_keys=[client_key],
                                    known_hosts=None, agent_path=None):
            assert hooks.activity.connections == 1
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect("127.0.0.1", port, username="rw", known_hosts=None, agent_path=None,
                                   client_keys=[asyncssh.generate_private_key("ssh-ed25519")])
    finally:
        await endpoint.close()


def test_keys_given_in_values_get_their_own_public_halves(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    def pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
        fmt = (serialization.PrivateFormat.PKCS8 if isinstance(key, ed25519.Ed25519PrivateKey)
               else serialization.PrivateFormat.TraditionalOpenSSL)
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()

    ca, signer = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    values = tmp_path / "keys.yaml"
    values.write_text(f"secrets:\n  sshCaKey: {json.dumps(pem(ca))}\n  jwtKey: {json.dumps(pem(signer))}\n")
    secret = rendered_secret(render("-f", str(values)))
    assert secret["ssh-ca-key"].decode() == pem(ca)
    ca_line = ca.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert to_openssh_line(secret["ssh-ca-public-key"]).encode() == ca_line
    jwt_line = signer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH)
    assert to_openssh_line(secret["jwt-public-key"]).encode() == jwt_line
