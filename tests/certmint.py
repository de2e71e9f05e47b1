"""Certificates for tests: good ones from the product's CA code (``issued``), and OpenSSH v01
certificates with any field wrong (``mint``), for tests of the gateway's certificate checks.

The product's CA (api/credentials/ssh_ca.py) can only issue correct certificates; attackers and broken
clients are not so polite. This encodes the certificate by hand (PROTOCOL.certkeys) so a test can set
the type, principals, validity, critical options, extensions, signing key and signature freely.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import asyncssh
from asyncssh.packet import String, UInt32, UInt64

from api.credentials import ssh_ca

USER, HOST = 1, 2


@dataclass
class CertSpec:
    """Every field of a user certificate; the defaults are what the platform CA issues."""

    principals: list[str] = field(default_factory=lambda: ["demo-1"])
    key_id: str = "user:usr_alice"
    cert_type: int = USER
    valid_after: int | None = None  # default: now - 30
    valid_before: int | None = None  # default: now + 300
    critical_options: dict[str, bytes] = field(default_factory=dict)
    extensions: dict[str, bytes] = field(default_factory=lambda: {"permit-pty": b""})
    corrupt_signature: bool = False
    # For key types that cannot be generated here (FIDO "sk-" keys): the algorithm and raw key fields.
    raw_key: tuple[bytes, bytes] | None = None


def _options(values: dict[str, bytes]) -> bytes:
    # Names sorted, as OpenSSH requires; each value is itself a string (empty for flags).
    return b"".join(String(name) + String(String(value) if value else b"") for name, value in sorted(values.items()))


def mint(ca: asyncssh.SSHKey, spec: CertSpec | None = None, *, user_key: asyncssh.SSHKey | None = None) -> bytes:
    """The certificate blob (as sent in SSH public key auth) for a user key (Ed25519 unless given),
    signed by `ca`."""
    spec = spec or CertSpec()
    now = int(time.time())
    if spec.raw_key is not None:
        key_type, key_fields = spec.raw_key
    else:
        key = (user_key or asyncssh.generate_private_key("ssh-ed25519")).convert_to_public()
        key_type = key.algorithm
        key_fields = key.public_data[len(String(key_type)):]  # the key's fields without its type name
    algorithm = key_type.removesuffix(b"@openssh.com") + b"-cert-v01@openssh.com"
    body = b"".join((
        String(algorithm), String(os.urandom(32)), key_fields,
        UInt64(1), UInt32(spec.cert_type), String(spec.key_id),
        String(b"".join(String(p) for p in spec.principals)),
        UInt64(now - 30 if spec.valid_after is None else spec.valid_after),
        UInt64(now + 300 if spec.valid_before is None else spec.valid_before),
        String(_options(spec.critical_options)), String(_options(spec.extensions)),
        String(b""), String(ca.public_data),
    ))
    signature = ca.sign(body, ca.sig_algorithms[0])
    if spec.corrupt_signature:
        signature = signature[:-1] + bytes([signature[-1] ^ 1])
    return body + String(signature)


CA = asyncssh.generate_private_key("ssh-ed25519")


def issued(public_key: str, session_id: str, seconds_left: int) -> str:
    """A good certificate line from the product's CA code with `seconds_left` to live (<= 0: expired)."""
    ttl = max(seconds_left, 60)
    signed = ssh_ca.sign_user_certificate(CA, public_key, session_id=session_id, user_id="test", ttl_s=ttl,
                                          now=time.time() + seconds_left - ttl)
    return signed.text
