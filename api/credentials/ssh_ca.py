"""The platform's OpenSSH user certificate authority (Ed25519): load or create the key, sign certs."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
from asyncssh.public_key import CERT_TYPE_USER, SSHOpenSSHCertificateV01

from api.credentials.keyfile import write_private, write_public
from api.settings import Settings

# Marks a certificate as read-only; OpenSSH ignores unknown extensions, the gateway reads it.
READONLY_EXTENSION = "readonly@orz.cloud"
KEY_ID_PREFIX = "user:"
# Tolerate small clock differences between the API and the gateway.
BACKDATE_S = 30
ALLOWED_USER_KEY_TYPES = frozenset({
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
})
MIN_RSA_BITS = 2048


class CertificateError(ValueError):
    """The public key given for signing is unusable; the message is safe to show the caller."""


class _OrzUserCertificate(SSHOpenSSHCertificateV01):
    """asyncssh's v01 certificate with one extra extension (asyncssh encodes only its known ones)."""

    _user_extension_encoders = (
        *SSHOpenSSHCertificateV01._user_extension_encoders,
        (READONLY_EXTENSION, SSHOpenSSHCertificateV01._encode_bool),
    )


@dataclass(frozen=True)
class SignedCertificate:
    text: str  # one OpenSSH line: "ssh-ed25519-cert-v01@openssh.com AAAA... comment"
    valid_after: int
    valid_before: int
    key_id: str


def ca_key_path(settings: Settings) -> Path:
    return settings.ssh_ca_key_file or settings.keys_dir / "ssh_ca"


def load_or_create_ca(settings: Settings) -> asyncssh.SSHKey:
    """Read the CA key, generating it (and its .pub) on first start."""
    path = ca_key_path(settings)
    if path.exists():
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="orz-user-ca")
    write_private(path, key.export_private_key("openssh"))
    write_public(path.with_name(path.name + ".pub"), key.export_public_key("openssh"))
    return key


def parse_user_key(public_key: str) -> asyncssh.SSHKey:
    """Parse one OpenSSH public key line, refusing certificates, private keys and weak keys."""
    line = public_key.strip()
    if "\n" in line or not line:
        raise CertificateError("public_key must be one OpenSSH public key line")
    if "PRIVATE KEY" in line:
        raise CertificateError("that is a private key: send the .pub file's contents")
    kind = line.split(None, 1)[0]
    if kind not in ALLOWED_USER_KEY_TYPES:
        raise CertificateError(f"unsupported public key type {kind[:40]!r}")
    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise CertificateError("public_key is not a valid OpenSSH public key") from exc
    if key.algorithm in (b"ssh-rsa",) and _rsa_bits(key) < MIN_RSA_BITS:
        raise CertificateError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    return key


def _rsa_bits(key: asyncssh.SSHKey) -> int:
    pyca = getattr(key, "pyca_key", None)
    return int(getattr(pyca, "key_size", 0))


def sign_user_certificate(
    ca_key: asyncssh.SSHKey,
    public_key: str,
    *,
    session_id: str,
    user_id: str,
    ttl_s: int,
    permit_port_forwarding: bool = True,
    readonly: bool = False,
    now: float | None = None,
) -> SignedCertificate:
    """Certify `public_key` for one session (principal) on behalf of one user (key id)."""
    user_key = parse_user_key(public_key)
    issued = int(time.time() if now is None else now)
    valid_after, valid_before = issued - BACKDATE_S, issued + ttl_s
    # Agent forwarding still needs the client's own `ssh -A`; the cert only stops it being refused.
    options: dict[str, object] = {"permit-pty": True, "permit-agent-forwarding": True}
    if permit_port_forwarding:
        options["permit-port-forwarding"] = True
    if readonly:
        options[READONLY_EXTENSION] = True
    key_id = f"{KEY_ID_PREFIX}{user_id}"
    cert = _OrzUserCertificate.generate(
        ca_key, user_key.algorithm + b"-cert-v01@openssh.com", user_key,
        secrets.randbits(63), CERT_TYPE_USER, key_id, [session_id], valid_after, valid_before,
        options, ca_key.sig_algorithms[0], f"orz {session_id}".encode(),
    )
    text = cert.export_certificate("openssh").decode().strip()
    return SignedCertificate(text=text, valid_after=valid_after, valid_before=valid_before, key_id=key_id)
