"""Attach JWTs: issue and verify, and every forgery the gateway must refuse."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.credentials import jwt as attach_jwt
from api.credentials.keyfile import write_private, write_public
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


def test_issued_claims_are_exactly_what_the_gateway_expects(key: ec.EllipticCurvePrivateKey) -> None:
    issued = attach_jwt.issue(key, user_id="usr_a", session_id="demo-1", ttl_s=120, now=1_000_000)
    claims = pyjwt.decode(issued.token, options={"verify_signature": False})
    assert claims == {"iss": "orz-api", "aud": "orz-gateway", "sub": "usr_a", "sid": "demo-1", "iat": 1_000_000,
                      "nbf": 1_000_000 - 30, "exp": 1_000_120, "jti": issued.jti}  # no "ro": read-write
    assert len(issued.jti) == 24 and issued.expires_at == 1_000_120  # 18 random bytes, URL-safe


def test_verify_reads_back_what_was_issued(key: ec.EllipticCurvePrivateKey) -> None:
    rw = attach_jwt.issue(key, user_id="usr_a", session_id="demo-1", ttl_s=60)
    got = attach_jwt.verify(rw.token, key.public_key(), session_id="demo-1", max_ttl_s=60)
    assert (got.user_id, got.session_id, got.jti, got.expires_at, got.readonly) == (
        "usr_a", "demo-1", rw.jti, rw.expires_at, False)
    ro = attach_jwt.issue(key, user_id="usr_a", session_id="demo-1", ttl_s=60, readonly=True)
    assert attach_jwt.verify(ro.token, key.public_key()).readonly is True


@pytest.mark.parametrize("late_s, ok", [(3, True), (5, False)])
def test_verify_allows_five_seconds_of_clock_skew(key: ec.EllipticCurvePrivateKey, late_s: int, ok: bool) -> None:
    now = int(time.time())
    token = attach_jwt.issue(key, user_id="u", session_id="s", ttl_s=60, now=now - 60 - late_s).token
    if ok:
        assert attach_jwt.verify(token, key.public_key()).user_id == "u"
    else:
        with pytest.raises(attach_jwt.TokenError) as err:
            attach_jwt.verify(token, key.public_key())
        assert str(err.value) == "attach token expired"


def test_verify_refusals_are_exact_lines(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    cases = [
        (attach_jwt.issue(other, user_id="u", session_id="s", ttl_s=60).token, {}, "attach token is not valid"),
        (attach_jwt.issue(key, user_id="u", session_id="s", ttl_s=60).token, {"session_id": "t"},
         "attach token is for another session"),
        (attach_jwt.issue(key, user_id="u", session_id="s", ttl_s=600).token, {"max_ttl_s": 120},
         "attach token lifetime is too long"),
    ]
    for token, kw, line in cases:
        with pytest.raises(attach_jwt.TokenError) as err:
            attach_jwt.verify(token, key.public_key(), **kw)  # type: ignore[arg-type]
        assert str(err.value) == line


def test_a_signing_key_on_another_curve_is_refused_naming_the_file(settings: Settings) -> None:
    path = attach_jwt.jwt_key_path(settings)
    p384 = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    with pytest.raises(attach_jwt.TokenError) as err:
        attach_jwt.load_or_create_signing_key(settings)
    assert str(err.value) == f"{path} is not a P-256 EC private key"


def test_key_files_get_owner_only_directories_and_readable_public_halves(tmp_path: Path) -> None:
    private = tmp_path / "fresh" / "k"
    write_private(private, b"secret")
    write_public(private.with_name("k.pub"), b"public")
    assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.with_name("k.pub").stat().st_mode) == 0o644
    assert private.read_bytes() == b"secret" and not list(private.parent.glob(".*.tmp"))
