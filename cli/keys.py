"""The user's SSH key pair and per-session certificates under ~/.config/orzbob/.

Certificates carry the session id as their only principal (DESIGN.md section 3), so each session gets
its own certificate file: two `ssh` processes for two sessions never overwrite each other's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cli.config import config_dir

# Refresh a certificate that has less than this left, so a connection never starts on a dying one.
MIN_VALID_S = 60


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    def public_line(self) -> str:
        return self.public.read_text().strip()


def key_pair() -> KeyPair:
    base = config_dir()
    return KeyPair(private=base / "id_ed25519", public=base / "id_ed25519.pub")


def ensure_key_pair() -> KeyPair:
    """Create the Ed25519 key pair (private part mode 0600) unless it is already there."""
    pair = key_pair()
    if pair.private.exists() and pair.public.exists():
        return pair
    pair.private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private_file(pair.private, private)
    write_private_file(pair.public, public + b" orzbob-cli\n")
    return pair


def write_private_file(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600: a concurrent `ssh` reads the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cert_path(session_id: str, readonly: bool = False) -> Path:
    # A '.' cannot occur in a session id, so "<id>.ro" never collides with another session's file.
    name = f"{session_id}.ro-cert.pub" if readonly else f"{session_id}-cert.pub"
    return config_dir() / "certs" / name


def save_certificate(session_id: str, certificate: str, readonly: bool = False) -> Path:
    path = cert_path(session_id, readonly)
    write_private_file(path, certificate.strip().encode() + b"\n")
    return path


def cert_seconds_left(path: Path, session_id: str, public_line: str, now: float | None = None) -> float | None:
    """Seconds the certificate at path is still valid for this session and key; None if unusable."""
    try:
        cert = serialization.load_ssh_public_identity(path.read_bytes().strip())
    except (OSError, ValueError, TypeError, NotImplementedError):
        return None
    if not isinstance(cert, serialization.SSHCertificate):
        return None
    if session_id.encode() not in cert.valid_principals:
        return None
    ours = public_line.split()[1] if len(public_line.split()) > 1 else ""
    certified = cert.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if certified.split()[1].decode() != ours:
        return None
    current = time.time() if now is None else now
    if current < cert.valid_after:
        return None
    return float(cert.valid_before) - current


def needs_refresh(session_id: str, readonly: bool = False, min_valid_s: float = MIN_VALID_S) -> bool:
    pair = key_pair()
    if not pair.public.exists():
        return True
    left = cert_seconds_left(cert_path(session_id, readonly), session_id, pair.public_line())
    return left is None or left < min_valid_s


def forget_session(session_id: str) -> None:
    """Remove a killed session's certificates."""
    for readonly in (False, True):
        cert_path(session_id, readonly).unlink(missing_ok=True)
