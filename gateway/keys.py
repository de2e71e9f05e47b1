"""The gateway's own key pairs: its SSH host key (for users) and its client key (for runners)."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from api.settings import Settings


def host_key_path(settings: Settings) -> Path:
    return settings.gateway_host_key_file or settings.keys_dir / "gateway_host_ed25519"


def client_key_path(settings: Settings) -> Path:
    return settings.gateway_client_key_file or settings.keys_dir / "gateway_client_ed25519"


def load_or_create(path: Path, comment: str) -> asyncssh.SSHKey:
    """Read an OpenSSH private key, creating an Ed25519 one (mode 0600, plus .pub) on first start."""
    if path.exists():
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.export_private_key("openssh"))
    finally:
        os.close(fd)
    os.replace(tmp, path)
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key("openssh"))
    return key
