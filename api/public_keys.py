"""Read the platform's public keys in any of the forms they are handed around in.

A public key reaches a service as one of: an OpenSSH public key line (what ``orz server`` writes), a PEM
SubjectPublicKeyInfo (``openssl pkey -pubout``), or a PEM X.509 certificate whose key is the one meant
(what the Helm chart can make: sprig's ``genSelfSignedCertWithKey`` wraps a private key's public half in a
certificate, and Helm has no other way to derive it). The certificate's own fields are ignored: only its
public key is used, and trust comes from how the file was delivered, not from the certificate.

Part of the API's contract with the gateway, like ``schemas`` and ``settings``: light imports only.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

FORMATS = "an OpenSSH public key line, a PEM public key or a PEM certificate"


class PublicKeyError(ValueError):
    """The text is none of the accepted public key forms; the message names no key material."""


def parse_public_key(data: bytes | str, *, source: str = "public key") -> PublicKeyTypes:
    """The public key in `data` (OpenSSH line, PEM SubjectPublicKeyInfo or PEM certificate)."""
    raw = (data.encode() if isinstance(data, str) else data).strip()
    if not raw:
        raise PublicKeyError(f"{source} is empty; expected {FORMATS}")
    if b"PRIVATE KEY" in raw:
        raise PublicKeyError(f"{source} holds a private key; give only its public half ({FORMATS})")
    try:
        if raw.startswith(b"-----BEGIN CERTIFICATE-----"):
            return x509.load_pem_x509_certificate(raw).public_key()
        if raw.startswith(b"-----BEGIN"):
            return serialization.load_pem_public_key(raw)
        return serialization.load_ssh_public_key(raw.splitlines()[0])
    except (ValueError, TypeError, IndexError) as exc:
        raise PublicKeyError(f"{source} is not {FORMATS}") from exc


def read_public_key(path: Path) -> PublicKeyTypes:
    """Read and parse a public key file (OSError when it cannot be read)."""
    return parse_public_key(path.read_bytes(), source=str(path))


def openssh_line(key: PublicKeyTypes) -> str:
    """The key as one OpenSSH public key line (no comment)."""
    try:
        return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    except (ValueError, TypeError) as exc:
        raise PublicKeyError(f"a {type(key).__name__} has no OpenSSH form") from exc


def to_openssh_line(data: bytes | str, *, source: str = "public key") -> str:
    """Normalise any accepted form to one OpenSSH public key line."""
    return openssh_line(parse_public_key(data, source=source))
