"""Attach JWTs: issue and verify, and every forgery the gateway must refuse."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from api.credentials import jwt as attach_jwt
from api.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    return attach_jwt.load_or_create_signing_key(settings)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"iss": "orz-api", "aud": "orz-gateway", "sub": "usr_1", "sid": "s1",
                                 "iat": now, "exp": now + 60, "jti": "j1"}
    claims.update(over)
    return claims


def test_keys_persisted_with_modes(settings: Settings, key: ec.EllipticCurvePrivateKey) -> None:
    path = settings.keys_dir / "jwt_es256.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (settings.keys_dir / "jwt_es256.pem.pub").read_bytes() == attach_jwt.public_pem(key)
    again = attach_jwt.load_or_create_signing_key(settings)
    assert attach_jwt.public_pem(again) == attach_jwt.public_pem(key)


def test_round_trip(key: ec.EllipticCurvePrivateKey) -> None:
    issued = attach_jwt.issue(key, user_id="usr_1", session_id="s1", ttl_s=120, readonly=True)
    claims = attach_jwt.verify(issued.token, key.public_key(), session_id="s1", max_ttl_s=120)
    assert (claims.user_id, claims.session_id, claims.readonly) == ("usr_1", "s1", True)
    assert claims.jti == issued.jti
    header = json.loads(base64.urlsafe_b64decode(issued.token.split(".")[0] + "=="))
    assert header["alg"] == "ES256"
    other = attach_jwt.issue(key, user_id="usr_1", session_id="s1", ttl_s=120)
    assert other.jti != issued.jti


def test_expired_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    issued = attach_jwt.issue(key, user_id="u", session_id="s1", ttl_s=10, now=time.time() - 60)
    with pytest.raises(attach_jwt.TokenError, match="expired"):
        attach_jwt.verify(issued.token, key.public_key(), session_id="s1")


def test_wrong_session_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    issued = attach_jwt.issue(key, user_id="u", session_id="s1", ttl_s=60)
    with pytest.raises(attach_jwt.TokenError, match="another session"):
        attach_jwt.verify(issued.token, key.public_key(), session_id="s2")


def test_other_key_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    issued = attach_jwt.issue(forger, user_id="u", session_id="s1", ttl_s=60)
    with pytest.raises(attach_jwt.TokenError):
        attach_jwt.verify(issued.token, key.public_key(), session_id="s1")


def test_alg_none_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{_b64(json.dumps(_claims()).encode())}."
    with pytest.raises(attach_jwt.TokenError):
        attach_jwt.verify(token, key.public_key(), session_id="s1")


def test_hs256_with_public_key_as_secret_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    import hashlib
    import hmac

    secret = attach_jwt.public_pem(key)
    signing_input = (f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
                     f"{_b64(json.dumps(_claims()).encode())}")
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(attach_jwt.TokenError):
        attach_jwt.verify(f"{signing_input}.{_b64(sig)}", key.public_key(), session_id="s1")


def test_wrong_audience_and_missing_claims_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    for claims in (_claims(aud="someone-else"), _claims(iss="evil"),
                   {k: v for k, v in _claims().items() if k != "jti"}):
        token = pyjwt.encode(claims, key, algorithm="ES256")
        with pytest.raises(attach_jwt.TokenError):
            attach_jwt.verify(token, key.public_key(), session_id="s1")


def test_overlong_lifetime_rejected(key: ec.EllipticCurvePrivateKey) -> None:
    token = pyjwt.encode(_claims(exp=int(time.time()) + 3600), key, algorithm="ES256")
    with pytest.raises(attach_jwt.TokenError, match="lifetime"):
        attach_jwt.verify(token, key.public_key(), session_id="s1", max_ttl_s=120)
