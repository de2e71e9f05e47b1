"""Local credential checks (CA-signed certificate, ES256 JWT) and the failed-auth limiter.

The gateway holds only public keys: the CA's and the JWT signer's (any form api.public_keys reads).
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import jwt as pyjwt
from asyncssh.packet import PacketDecodeError, SSHPacket
from asyncssh.public_key import decode_ssh_certificate
from cryptography.hazmat.primitives.asymmetric import ec

from api import public_keys
from api.addresses import limit_key
from api.schemas import SESSION_ID_RE
from api.settings import Settings
from gateway.errors import CredentialRejected

CERT_TYPE_USER = 1
KEY_ID_PREFIX = "user:"
READONLY_EXTENSION = b"readonly@orz.cloud"
JWT_ALGORITHMS = ["ES256"]  # explicit: never "none", never HMAC with a public key
JWT_ISSUER = "orz-api"
JWT_AUDIENCE = "orz-gateway"
JWT_REQUIRED = ["exp", "iat", "iss", "aud", "sub", "sid", "jti"]
CLOCK_SKEW_S = 5
MAX_JWT_LEN = 4096
# The API backdates valid_after by this much (api/credentials/ssh_ca.py BACKDATE_S) to absorb clock skew.
CERT_BACKDATE_S = 30


@dataclass(frozen=True, slots=True)
class AttachCredential:
    """Who is attaching, established by a credential that passed local verification."""

    user_id: str
    method: str  # "certificate" | "jwt"
    readonly: bool = False
    jti: str | None = None
    expires_at: int | None = None


@dataclass(frozen=True)
class TrustAnchors:
    ca_key: asyncssh.SSHKey
    jwt_public_key: ec.EllipticCurvePublicKey
    jwt_max_ttl_s: int
    cert_max_ttl_s: int


def ca_public_path(settings: Settings) -> Path:
    if settings.ssh_ca_public_key_file:
        return settings.ssh_ca_public_key_file
    private = settings.ssh_ca_key_file or settings.keys_dir / "ssh_ca"
    return private.with_name(private.name + ".pub")


def jwt_public_path(settings: Settings) -> Path:
    if settings.jwt_public_key_file:
        return settings.jwt_public_key_file
    private = settings.jwt_key_file or settings.keys_dir / "jwt_es256.pem"
    return private.with_name(private.name + ".pub")


def load_trust_anchors(settings: Settings) -> TrustAnchors:
    """Read the CA and JWT public keys (OSError when a file cannot be read, PublicKeyError when wrong)."""
    ca_key = asyncssh.import_public_key(public_keys.openssh_line(public_keys.read_public_key(
        ca_public_path(settings))))
    path = jwt_public_path(settings)
    pub = public_keys.read_public_key(path)
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise public_keys.PublicKeyError(f"{path} is not a P-256 EC public key (the JWT signer's)")
    return TrustAnchors(ca_key=ca_key, jwt_public_key=pub, jwt_max_ttl_s=settings.attach_token_ttl_s,
                        cert_max_ttl_s=settings.longest_cert_ttl_s)


def valid_session_id(username: str) -> bool:
    return bool(SESSION_ID_RE.match(username))


@dataclass(frozen=True)
class CertFields:
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: tuple[bytes, ...]
    extensions: frozenset[bytes]
    signing_key: bytes


def is_certificate(blob: bytes) -> bool:
    try:
        return SSHPacket(blob).get_string().endswith(b"-cert-v01@openssh.com")
    except PacketDecodeError:
        return False


def parse_certificate(blob: bytes) -> CertFields:
    """Read the fields asyncssh does not expose (key id, custom extensions) from a v01 cert blob."""
    try:
        packet = SSHPacket(blob)
        algorithm = packet.get_string()
        if not algorithm.endswith(b"-cert-v01@openssh.com"):
            raise CredentialRejected("not an OpenSSH certificate")
        packet.get_string()  # nonce
        _skip_public_key(packet, algorithm)
        packet.get_uint64()  # serial
        cert_type = packet.get_uint32()
        key_id = packet.get_string().decode("utf-8")
        names = SSHPacket(packet.get_string())
        principals = []
        while names:
            principals.append(names.get_string().decode("utf-8"))
        valid_after, valid_before = packet.get_uint64(), packet.get_uint64()
        crit = SSHPacket(packet.get_string())
        critical_options = []
        while crit:
            critical_options.append(crit.get_string())
            crit.get_string()
        ext = SSHPacket(packet.get_string())
        extensions = set()
        while ext:
            extensions.add(ext.get_string())
            ext.get_string()
        packet.get_string()  # reserved
        signing_key = packet.get_string()
    except (PacketDecodeError, UnicodeDecodeError) as exc:
        raise CredentialRejected("malformed certificate") from exc
    return CertFields(cert_type, key_id, tuple(principals), valid_after, valid_before,
                      tuple(critical_options), frozenset(extensions), signing_key)


def _skip_public_key(packet: SSHPacket, algorithm: bytes) -> None:
    # The number of fields of the certified key depends on its type.
    counts = {b"ssh-ed25519": 1, b"ssh-rsa": 2, b"ecdsa-sha2": 2, b"sk-ssh-ed25519": 2, b"sk-ecdsa": 3}
    for prefix, count in counts.items():
        if algorithm.startswith(prefix):
            for _ in range(count):
                packet.get_string()
            return
    raise CredentialRejected("unsupported certificate key type")


def check_certificate(blob: bytes, username: str, anchors: TrustAnchors,
                      now: float | None = None) -> AttachCredential:
    """Accept a user cert signed by the platform CA for exactly this session, valid now."""
    fields = parse_certificate(blob)
    if not hmac.compare_digest(fields.signing_key, anchors.ca_key.public_data):
        raise CredentialRejected("certificate not signed by Orzbob Cloud")
    if fields.cert_type != CERT_TYPE_USER:
        raise CredentialRejected("not a user certificate")
    # The platform CA issues none; OpenSSH requires refusing any critical option not enforced, and
    # force-command or source-address would not be (the runner runs what the client asks, the web door
    # tunnels arrive from loopback).
    if fields.critical_options:
        raise CredentialRejected("certificate has critical options the gateway does not enforce")
    _verify_signature(blob)
    # A cert with no principals would be valid for every user name in OpenSSH: never accept one.
    if not fields.principals or username not in fields.principals:
        raise CredentialRejected(f"certificate is not for session {username}")
    t = time.time() if now is None else now
    if t < fields.valid_after - CLOCK_SKEW_S:
        raise CredentialRejected("certificate not yet valid (check your clock)")
    if t >= fields.valid_before:
        raise CredentialRejected("certificate expired")
    if fields.valid_before - fields.valid_after > anchors.cert_max_ttl_s + CERT_BACKDATE_S + CLOCK_SKEW_S:
        raise CredentialRejected("certificate lifetime is too long")
    if not fields.key_id.startswith(KEY_ID_PREFIX) or len(fields.key_id) <= len(KEY_ID_PREFIX):
        raise CredentialRejected("certificate does not name a user")
    return AttachCredential(user_id=fields.key_id[len(KEY_ID_PREFIX):], method="certificate",
                     readonly=READONLY_EXTENSION in fields.extensions)


def _verify_signature(blob: bytes) -> None:
    """The CA's signature over the certificate (asyncssh's decoder checks it)."""
    try:
        decode_ssh_certificate(blob)
    except asyncssh.KeyImportError as exc:
        raise CredentialRejected("certificate signature not valid") from exc


def check_jwt(token: str, username: str, anchors: TrustAnchors) -> AttachCredential:
    """Verify an attach JWT locally: ES256 signature, expiry, issuer, audience, sid == username."""
    token = token.strip()
    if not token or len(token) > MAX_JWT_LEN:
        raise CredentialRejected("attach token is not valid")
    try:
        claims = pyjwt.decode(token, anchors.jwt_public_key, algorithms=JWT_ALGORITHMS, audience=JWT_AUDIENCE,
                              issuer=JWT_ISSUER, options={"require": JWT_REQUIRED}, leeway=CLOCK_SKEW_S)
    except pyjwt.ExpiredSignatureError as exc:
        raise CredentialRejected("attach token expired") from exc
    except pyjwt.PyJWTError as exc:
        raise CredentialRejected("attach token is not valid") from exc
    if not hmac.compare_digest(str(claims.get("sid", "")).encode(), username.encode()):
        raise CredentialRejected(f"attach token is not for session {username}")
    if int(claims["exp"]) - int(claims["iat"]) > anchors.jwt_max_ttl_s + CLOCK_SKEW_S:
        raise CredentialRejected("attach token lifetime is too long")
    return AttachCredential(user_id=str(claims["sub"]), method="jwt", readonly=bool(claims.get("ro", False)),
                     jti=str(claims["jti"]), expires_at=int(claims["exp"]))


class FailureLimiter:
    """Counts failed authentications per source address (an IPv6 one by its /64) in a sliding window."""

    MAX_TRACKED = 100_000

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}  # source -> time.monotonic() (from the shared count)

    def _recent(self, source: str, now: float) -> deque[float] | None:
        source = limit_key(source)
        q = self._failures.get(source)
        if q is None:
            return None
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._failures[source]
            return None
        return q

    def blocked(self, source: str, now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        if self._shared_block(source, t):
            return True
        q = self._recent(source, t)
        return q is not None and len(q) >= self.limit

    def retry_after(self, source: str, now: float | None = None) -> int:
        t = time.monotonic() if now is None else now
        shared = self._shared_block(source, t)
        q = self._recent(source, t)
        local = 0 if not q else max(1, int(q[0] + self.window_s - t) + 1)
        return max(local, max(1, int(shared - t) + 1) if shared else 0)

    def block_for(self, source: str, seconds: float, now: float | None = None) -> None:
        """Refuse `source` for `seconds`: the count every replica shares says it reached the limit."""
        t = time.monotonic() if now is None else now
        if len(self._blocked_until) >= self.MAX_TRACKED:
            self._blocked_until = {k: v for k, v in self._blocked_until.items() if v > t}
        source = limit_key(source)
        self._blocked_until[source] = max(self._blocked_until.get(source, 0.0), t + seconds)

    def _shared_block(self, source: str, now: float) -> float:
        source = limit_key(source)
        until = self._blocked_until.get(source)
        if until is None:
            return 0.0
        if until <= now:
            del self._blocked_until[source]
            return 0.0
        return until

    def record_failure(self, source: str, now: float | None = None) -> bool:
        """Count one failure; True when the source is now blocked."""
        t = time.monotonic() if now is None else now
        if len(self._failures) >= self.MAX_TRACKED:
            # Bounded memory under a spray of addresses: forget the stalest entries.
            for key in list(self._failures)[: self.MAX_TRACKED // 10]:
                del self._failures[key]
        q = self._recent(source, t) or self._failures.setdefault(limit_key(source), deque())
        q.append(t)
        return len(q) >= self.limit
