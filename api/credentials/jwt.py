"""Attach JWTs (ES256): short-lived, single-use tokens the gateway verifies with the public key only."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.credentials.keyfile import write_private, write_public
from api.settings import Settings

ALGORITHMS = ["ES256"]
ISSUER = "orz-api"
AUDIENCE = "orz-gateway"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "sid", "jti"]


class TokenError(ValueError):
    """The token is not valid for this use; the message is safe to show."""


@dataclass(frozen=True)
class AttachToken:
    token: str
    jti: str
    expires_at: int


@dataclass(frozen=True)
class AttachClaims:
    user_id: str
    session_id: str
    jti: str
    expires_at: int
    readonly: bool


def jwt_key_path(settings: Settings) -> Path:
    return settings.jwt_key_file or settings.keys_dir / "jwt_es256.pem"


def public_key_path(private_path: Path) -> Path:
    """Where the public half lives: the gateway reads this file, never the private key."""
    return private_path.with_name(private_path.name + ".pub")


def load_or_create_signing_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """Read the P-256 signing key, generating it and its .pub (PEM SubjectPublicKeyInfo) if missing.

    A key we did not generate is only read: it may sit on a read-only mount (a Kubernetes Secret), and
    whoever provided it provides its public half too (ORZ_JWT_PUBLIC_KEY_FILE)."""
    path = jwt_key_path(settings)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise TokenError(f"{path} is not a P-256 EC private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem)
    # The embedded gateway reads this file: write it with the key it belongs to.
    write_public(public_key_path(path), public_pem(key))
    return key


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def issue(key: ec.EllipticCurvePrivateKey, *, user_id: str, session_id: str, ttl_s: int,
          readonly: bool = False, now: float | None = None) -> AttachToken:
    """Sign a single-use attach token for one user and one session."""
    issued = int(time.time() if now is None else now)
    jti = secrets.token_urlsafe(18)
    claims: dict[str, Any] = {
        "iss": ISSUER, "aud": AUDIENCE, "sub": user_id, "sid": session_id,
        "iat": issued, "nbf": issued - 30, "exp": issued + ttl_s, "jti": jti,
    }
    if readonly:
        claims["ro"] = True
    token = pyjwt.encode(claims, key, algorithm="ES256")
    return AttachToken(token=token, jti=jti, expires_at=issued + ttl_s)


def verify(token: str, public_key: ec.EllipticCurvePublicKey, *, session_id: str | None = None,
           max_ttl_s: int | None = None) -> AttachClaims:
    """Check signature (ES256 only), expiry, issuer, audience and, when given, the session."""
    try:
        claims = pyjwt.decode(
            token, public_key, algorithms=ALGORITHMS, audience=AUDIENCE, issuer=ISSUER,
            options={"require": REQUIRED_CLAIMS}, leeway=5,
        )
    except pyjwt.ExpiredSignatureError as exc:
        raise TokenError("attach token expired") from exc
    except pyjwt.PyJWTError as exc:
        raise TokenError("attach token is not valid") from exc
    if session_id is not None and claims.get("sid") != session_id:
        raise TokenError("attach token is for another session")
    if max_ttl_s is not None and int(claims["exp"]) - int(claims["iat"]) > max_ttl_s:
        raise TokenError("attach token lifetime is too long")
    return AttachClaims(user_id=str(claims["sub"]), session_id=str(claims["sid"]), jti=str(claims["jti"]),
                        expires_at=int(claims["exp"]), readonly=bool(claims.get("ro", False)))
