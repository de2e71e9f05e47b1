"""The gateway's local credential checks, called directly with crafted certificates and tokens.

Every refusal here is one a user (or attacker) could otherwise turn into a login; the SSH-level tests in
test_rejections.py show the same refusals reach the client as one readable line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import asyncssh
import jwt as pyjwt
import pytest
from asyncssh.packet import String
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api import public_keys
from api.credentials import jwt as attach_jwt
from api.credentials import ssh_ca
from api.settings import Settings
from gateway.auth import (
    FailureLimiter,
    TrustAnchors,
    check_certificate,
    check_jwt,
    is_certificate,
    load_trust_anchors,
    parse_certificate,
    valid_session_id,
)
from gateway.errors import CredentialRejected
from tests.certmint import HOST, CertSpec, mint

SESSION = "demo-1"
USER = "usr_alice"
CERT_TTL = 300
JWT_TTL = 120


@pytest.fixture(scope="module")
def ca() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="module")
def jwt_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def anchors(ca: asyncssh.SSHKey, jwt_key: ec.EllipticCurvePrivateKey) -> TrustAnchors:
    return TrustAnchors(ca_key=ca.convert_to_public(), jwt_public_key=jwt_key.public_key(),
                        jwt_max_ttl_s=JWT_TTL, cert_max_ttl_s=CERT_TTL)


def refused(blob: bytes, anchors: TrustAnchors, username: str = SESSION, now: float | None = None) -> str:
    with pytest.raises(CredentialRejected) as err:
        check_certificate(blob, username, anchors, now=now)
    return err.value.line


def issued_by_api(ca: asyncssh.SSHKey, ttl_s: int = CERT_TTL, now: float | None = None, **kw: object) -> bytes:
    """A certificate from the product's own CA, as the SSH client sends it (the decoded blob)."""
    user_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    signed = ssh_ca.sign_user_certificate(ca, user_key, session_id=SESSION, user_id=USER, ttl_s=ttl_s,
                                          now=now, **kw)  # type: ignore[arg-type]
    return base64.b64decode(signed.text.split()[1])


# -- certificates ---------------------------------------------------------------------------------


def test_certificate_from_the_platform_ca_is_accepted(ca, anchors):
    who = check_certificate(issued_by_api(ca), SESSION, anchors)
    assert (who.user_id, who.method, who.readonly) == (USER, "certificate", False)
    assert check_certificate(issued_by_api(ca, readonly=True), SESSION, anchors).readonly is True


def test_certificate_at_the_longest_configured_lifetime_is_accepted(ca, anchors):
    # The API backdates valid_after by 30 s: its longest certificate must still pass.
    assert check_certificate(issued_by_api(ca, ttl_s=CERT_TTL), SESSION, anchors).user_id == USER


def test_minted_default_certificate_is_accepted(ca, anchors):
    # The minting helper's defaults are a good certificate: each refusal below changes one field.
    assert check_certificate(mint(ca), SESSION, anchors).user_id == USER


def test_certificate_without_principals_is_refused(ca, anchors):
    # OpenSSH treats an empty principal list as "any user": for us that would be any session.
    assert refused(mint(ca, CertSpec(principals=[])), anchors) == f"certificate is not for session {SESSION}"


def test_certificate_for_another_session_is_refused(ca, anchors):
    blob = mint(ca, CertSpec(principals=["other-1"]))
    assert refused(blob, anchors) == f"certificate is not for session {SESSION}"
    # And the principal must match exactly, not as a prefix or substring.
    assert "not for session" in refused(mint(ca, CertSpec(principals=["demo-10"])), anchors)


def test_host_certificate_is_refused(ca, anchors):
    assert refused(mint(ca, CertSpec(cert_type=HOST)), anchors) == "not a user certificate"


def test_certificate_not_yet_valid_is_refused(ca, anchors):
    now = int(time.time())
    blob = mint(ca, CertSpec(valid_after=now + 60, valid_before=now + 200))
    assert refused(blob, anchors, now=now) == "certificate not yet valid (check your clock)"
    # Within the 5 s clock skew allowance it is fine; just past it, not.
    assert check_certificate(blob, SESSION, anchors, now=now + 55).user_id == USER
    assert "not yet valid" in refused(blob, anchors, now=now + 54)


def test_expired_certificate_is_refused(ca, anchors):
    now = int(time.time())
    blob = mint(ca, CertSpec(valid_after=now - 100, valid_before=now))
    assert refused(blob, anchors, now=now) == "certificate expired"
    assert check_certificate(blob, SESSION, anchors, now=now - 1).user_id == USER


def test_certificate_with_too_long_a_lifetime_is_refused(ca, anchors):
    now = int(time.time())
    longest = CERT_TTL + 30 + 5  # the API's backdating and the clock skew allowance
    ok = mint(ca, CertSpec(valid_after=now - 30, valid_before=now - 30 + longest))
    assert check_certificate(ok, SESSION, anchors, now=now).user_id == USER
    blob = mint(ca, CertSpec(valid_after=now - 30, valid_before=now - 30 + longest + 1))
    assert refused(blob, anchors, now=now) == "certificate lifetime is too long"
    # A certificate from a CA configured for longer lifetimes than the gateway allows.
    assert refused(issued_by_api(ca, ttl_s=3600), anchors) == "certificate lifetime is too long"


def test_certificate_from_another_ca_is_refused(anchors):
    other = asyncssh.generate_private_key("ssh-ed25519")
    assert refused(mint(other), anchors) == "certificate not signed by Orzbob Cloud"


def test_certificate_with_a_forged_signature_is_refused(ca, anchors):
    # The signing key field names our CA, but the signature does not verify.
    assert refused(mint(ca, CertSpec(corrupt_signature=True)), anchors) == "certificate signature not valid"


@pytest.mark.parametrize("option, value", [
    ("force-command", b"/bin/true"),
    ("source-address", b"10.0.0.0/8"),
    ("verify-required", b""),
    ("something@example.com", b"x"),
])
def test_certificate_with_critical_options_is_refused(ca, anchors, option, value):
    blob = mint(ca, CertSpec(critical_options={option: value}))
    assert refused(blob, anchors) == "certificate has critical options the gateway does not enforce"


def test_unknown_extensions_are_ignored_but_readonly_is_read(ca, anchors):
    blob = mint(ca, CertSpec(extensions={"permit-pty": b"", "whatever@example.com": b"", "readonly@orz.cloud": b""}))
    assert check_certificate(blob, SESSION, anchors).readonly is True


@pytest.mark.parametrize("key_id", ["", "user:", "usr_alice", "admin:usr_alice"])
def test_certificate_must_name_a_user(ca, anchors, key_id):
    assert refused(mint(ca, CertSpec(key_id=key_id)), anchors) == "certificate does not name a user"


@pytest.mark.parametrize("blob", [b"", b"\x00\x00\x00\x03abc", b"\x00\x00\x00\x20ssh-ed25519-cert-v01@openssh.com"])
def test_malformed_certificate_is_refused(anchors, blob):
    assert refused(blob, anchors) in ("malformed certificate", "not an OpenSSH certificate")


def test_truncated_certificate_is_refused(ca, anchors):
    assert refused(mint(ca)[:90], anchors) == "malformed certificate"
    assert refused(mint(ca)[:-20], anchors) == "certificate signature not valid"


def test_trust_anchors_take_the_lifetimes_from_settings(tmp_path: Path, ca, jwt_key):
    keys = tmp_path / "keys"  # Settings.keys_dir under data_dir
    keys.mkdir()
    (keys / "ssh_ca.pub").write_bytes(ca.export_public_key("openssh"))
    (keys / "jwt_es256.pem.pub").write_bytes(attach_jwt.public_pem(jwt_key))
    settings = Settings(data_dir=tmp_path, cert_ttl_s=600, attach_token_ttl_s=60)
    loaded = load_trust_anchors(settings)
    assert (loaded.cert_max_ttl_s, loaded.jwt_max_ttl_s) == (600, 60)
    # Certificates users asked to last longer (orz cloud cert --ttl) up to the admin's cert_max_ttl_s.
    longer = load_trust_anchors(Settings(data_dir=tmp_path, cert_ttl_s=300, cert_max_ttl_s=3600))
    assert longer.cert_max_ttl_s == 3600
    assert loaded.ca_key.public_data == ca.public_data
    assert loaded.jwt_public_key.public_numbers() == jwt_key.public_key().public_numbers()


# -- attach JWTs ----------------------------------------------------------------------------------


def claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {"iss": "orz-api", "aud": "orz-gateway", "sub": USER, "sid": SESSION,
                               "iat": now, "nbf": now - 30, "exp": now + JWT_TTL, "jti": "j-1"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def token_refused(token: str, anchors: TrustAnchors, username: str = SESSION) -> str:
    with pytest.raises(CredentialRejected) as err:
        check_jwt(token, username, anchors)
    return err.value.line


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_token_from_the_api_is_accepted(jwt_key, anchors):
    issued = attach_jwt.issue(jwt_key, user_id=USER, session_id=SESSION, ttl_s=JWT_TTL, readonly=True)
    who = check_jwt(f"  {issued.token}\n", SESSION, anchors)
    assert (who.user_id, who.method, who.readonly, who.jti, who.expires_at) == (
        USER, "jwt", True, issued.jti, issued.expires_at)


def test_token_with_alg_none_is_refused(anchors):
    token = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims()).encode()) + "."
    assert token_refused(token, anchors) == "attach token is not valid"


def test_token_signed_hs256_with_the_public_key_is_refused(jwt_key, anchors):
    # The classic algorithm confusion: HMAC keyed with the (public) verification key.
    secret = jwt_key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims()).encode())
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert token_refused(signing_input + "." + b64(mac), anchors) == "attach token is not valid"


def test_token_signed_by_another_key_is_refused(anchors):
    other = ec.generate_private_key(ec.SECP256R1())
    assert token_refused(pyjwt.encode(claims(), other, algorithm="ES256"), anchors) == "attach token is not valid"


def test_token_with_another_es_algorithm_is_refused(anchors):
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert token_refused(pyjwt.encode(claims(), p384, algorithm="ES384"), anchors) == "attach token is not valid"


@pytest.mark.parametrize("over", [{"aud": "orz-api"}, {"aud": "someone-else"}, {"iss": "orz-gateway"},
                                  {"iss": "evil"}])
def test_token_for_another_audience_or_issuer_is_refused(jwt_key, anchors, over):
    token = pyjwt.encode(claims(**over), jwt_key, algorithm="ES256")
    assert token_refused(token, anchors) == "attach token is not valid"


@pytest.mark.parametrize("missing", ["exp", "iat", "iss", "aud", "sub", "sid", "jti"])
def test_token_missing_a_claim_is_refused(jwt_key, anchors, missing):
    token = pyjwt.encode(claims(**{missing: None}), jwt_key, algorithm="ES256")
    assert token_refused(token, anchors).startswith("attach token ")


def test_token_with_too_long_a_lifetime_is_refused(jwt_key, anchors):
    now = int(time.time())
    ok = pyjwt.encode(claims(iat=now, exp=now + JWT_TTL + 5), jwt_key, algorithm="ES256")
    assert check_jwt(ok, SESSION, anchors).user_id == USER  # within the clock skew allowance
    long = pyjwt.encode(claims(iat=now, exp=now + JWT_TTL + 6), jwt_key, algorithm="ES256")
    assert token_refused(long, anchors) == "attach token lifetime is too long"


def test_token_for_another_session_is_refused(jwt_key, anchors):
    token = pyjwt.encode(claims(sid="other-1"), jwt_key, algorithm="ES256")
    assert token_refused(token, anchors) == f"attach token is not for session {SESSION}"
    assert "not for session" in token_refused(pyjwt.encode(claims(sid="demo-10"), jwt_key, algorithm="ES256"),
                                              anchors)


def test_expired_token_is_refused(jwt_key, anchors):
    now = int(time.time())
    token = pyjwt.encode(claims(iat=now - 100, nbf=now - 130, exp=now - 10), jwt_key, algorithm="ES256")
    assert token_refused(token, anchors) == "attach token expired"


def test_token_not_yet_valid_is_refused(jwt_key, anchors):
    now = int(time.time())
    token = pyjwt.encode(claims(iat=now + 60, nbf=now + 60, exp=now + 100), jwt_key, algorithm="ES256")
    assert token_refused(token, anchors) == "attach token is not valid"


@pytest.mark.parametrize("token", ["", "   ", "x" * 4097])
def test_empty_or_oversized_token_is_refused(anchors, token):
    assert token_refused(token, anchors) == "attach token is not valid"


# -- parsing every key type, and what is not a certificate ----------------------------------------


@pytest.mark.parametrize("kind", ["ecdsa-sha2-nistp256", "ssh-rsa"])
def test_certificates_for_other_key_types_are_read_and_accepted(ca, anchors, kind):
    user_key = asyncssh.generate_private_key(kind, **({"key_size": 2048} if kind == "ssh-rsa" else {}))
    blob = mint(ca, CertSpec(principals=[SESSION, "other-1"]), user_key=user_key)
    assert check_certificate(blob, SESSION, anchors).user_id == USER
    assert check_certificate(blob, "other-1", anchors).user_id == USER


@pytest.mark.parametrize("key_type, fields", [
    # FIDO keys cannot be made here: their public fields, as OpenSSH encodes them.
    (b"sk-ssh-ed25519@openssh.com", [b"\x01" * 32, b"ssh:"]),
    (b"sk-ecdsa-sha2-nistp256@openssh.com", [b"nistp256", b"\x04" + b"\x02" * 64, b"ssh:"]),
])
def test_security_key_certificates_are_parsed_field_by_field(ca, key_type, fields):
    blob = mint(ca, CertSpec(principals=["a-1", "b-2"], key_id="user:usr_x",
                             extensions={"permit-pty": b"", "readonly@orz.cloud": b""},
                             raw_key=(key_type, b"".join(String(f) for f in fields))))
    fields_read = parse_certificate(blob)
    assert fields_read.principals == ("a-1", "b-2") and fields_read.key_id == "user:usr_x"
    assert fields_read.extensions == {b"permit-pty", b"readonly@orz.cloud"}
    assert fields_read.signing_key == ca.public_data and fields_read.cert_type == 1


def test_a_certificate_of_an_unknown_key_type_is_refused(ca, anchors):
    blob = mint(ca, CertSpec(raw_key=(b"ssh-dss", String(b"p") + String(b"q") + String(b"g") + String(b"y"))))
    assert refused(blob, anchors) == "unsupported certificate key type"


def test_is_certificate_tells_certificates_from_keys_and_garbage(ca):
    assert is_certificate(mint(ca))
    assert not is_certificate(asyncssh.generate_private_key("ssh-ed25519").convert_to_public().public_data)
    assert not is_certificate(b"\x00\x00\x00\xffshort")
    assert not is_certificate(b"")


@pytest.mark.parametrize("name, ok", [("demo-1", True), ("a" * 32, True), ("Demo-1", False), ("a" * 33, False),
                                      ("demo_1", False), ("", False), ("demo-1;id", False)])
def test_valid_session_id(name, ok):
    assert valid_session_id(name) is ok


def test_trust_anchors_refuse_a_jwt_key_that_is_not_ec(tmp_path: Path, ca):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "ssh_ca.pub").write_bytes(ca.export_public_key("openssh"))
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    (keys / "jwt_es256.pem.pub").write_bytes(rsa.export_public_key("pkcs8-pem"))
    with pytest.raises(public_keys.PublicKeyError, match="not a P-256 EC public key"):
        load_trust_anchors(Settings(data_dir=tmp_path))


# -- token edge cases ------------------------------------------------------------------------------


def test_the_largest_token_accepted_is_4096_characters(jwt_key, anchors):
    sizes = {}
    for pad in range(2600, 3200):
        token = pyjwt.encode(claims(pad="a" * pad), jwt_key, algorithm="ES256")
        sizes.setdefault(len(token), token)
    at_limit = sizes[4096]
    assert check_jwt(at_limit, SESSION, anchors).user_id == USER
    over = min(n for n in sizes if n > 4096)
    assert token_refused(sizes[over], anchors) == "attach token is not valid"  # valid, but too large


def test_clock_skew_of_a_few_seconds_is_tolerated(jwt_key, anchors):
    now = int(time.time())
    late = pyjwt.encode(claims(iat=now - 100, nbf=now - 100, exp=now - 3), jwt_key, algorithm="ES256")
    assert check_jwt(late, SESSION, anchors).user_id == USER
    early = pyjwt.encode(claims(iat=now + 3, nbf=now + 3, exp=now + 60), jwt_key, algorithm="ES256")
    assert check_jwt(early, SESSION, anchors).user_id == USER


def test_a_token_without_ro_is_read_write(jwt_key, anchors):
    assert check_jwt(pyjwt.encode(claims(), jwt_key, algorithm="ES256"), SESSION, anchors).readonly is False


# -- the failed-authentication limiter -------------------------------------------------------------


def test_limiter_blocks_a_source_after_the_limit_within_the_window():
    limiter = FailureLimiter(limit=3, window_s=60)
    assert not limiter.record_failure("1.2.3.4", now=100)
    assert not limiter.record_failure("1.2.3.4", now=101)
    assert not limiter.blocked("1.2.3.4", now=101)
    assert limiter.record_failure("1.2.3.4", now=102)  # the third failure blocks
    assert limiter.blocked("1.2.3.4", now=102) and not limiter.blocked("5.6.7.8", now=102)
    # Blocked until the oldest failure leaves the window: retry after (100 + 60) - 102 = 58 s (+1 rounding).
    assert limiter.retry_after("1.2.3.4", now=102) == 59
    assert limiter.retry_after("5.6.7.8", now=102) == 0
    assert limiter.blocked("1.2.3.4", now=159.5)
    assert not limiter.blocked("1.2.3.4", now=160)  # exactly one window after the first failure
    assert limiter.retry_after("1.2.3.4", now=161.9) == 1  # the second failure expires within the second


def test_limiter_window_slides_and_forgets_quiet_sources():
    limiter = FailureLimiter(limit=2, window_s=10)
    limiter.record_failure("a", now=0)
    assert not limiter.record_failure("a", now=10)  # the first one has left the window
    assert limiter.record_failure("a", now=15)
    assert not limiter.blocked("a", now=25) and limiter.retry_after("a", now=30) == 0
    assert "a" not in limiter._failures  # nothing kept for a source that went quiet


def test_limiter_memory_is_bounded_under_an_address_spray():
    limiter = FailureLimiter(limit=2, window_s=60)
    limiter.MAX_TRACKED = 20
    for i in range(19):
        limiter.record_failure(f"10.0.0.{i}", now=1)
    assert len(limiter._failures) == 19
    limiter.record_failure("10.0.0.19", now=1)
    assert len(limiter._failures) == 20  # at the bound, nothing forgotten yet
    limiter.record_failure("10.0.1.0", now=2)  # over it: the stalest tenth goes
    assert len(limiter._failures) == 19 and "10.0.0.0" not in limiter._failures and "10.0.0.1" not in limiter._failures
    assert "10.0.0.2" in limiter._failures and limiter.record_failure("10.0.1.0", now=3)


def test_limiter_on_the_real_clock():
    limiter = FailureLimiter(limit=2, window_s=60)
    assert not limiter.record_failure("a")
    assert limiter.record_failure("a") and limiter.blocked("a") and not limiter.blocked("b")
    assert 59 <= limiter.retry_after("a") <= 61
