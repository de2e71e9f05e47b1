"""The public halves of the gateway's two key pairs, as the API hands them on.

The client key's half goes to every runner (the only key a runner lets in); the host key's half goes to
the CLI in each attach grant, which pins it before ssh first connects, so no user has to trust the gateway
on first use. Either may be configured (any form `api.public_keys` reads) or read from the `.pub` file
written beside the key in the data dir (`orz server`). The API never needs the private halves.
"""

from __future__ import annotations

from pathlib import Path

from api import public_keys
from api.settings import Settings


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names host:port in known_hosts."""
    return host if port == 22 else f"[{host}]:{port}"


def _public_half(configured: str, env_name: str, key_file: Path) -> str:
    if configured.strip():
        return public_keys.to_openssh_line(configured, source=env_name)
    pub = Path(f"{key_file}.pub")
    return public_keys.to_openssh_line(pub.read_bytes(), source=str(pub)) if pub.exists() else ""


def gateway_public_key(settings: Settings) -> str:
    """The public half of the gateway's client key, which runners are told to trust, as the one OpenSSH
    line a runner reads, whatever form it was configured in (the chart's is a PEM certificate)."""
    return _public_half(settings.gateway_public_key, "ORZ_GATEWAY_PUBLIC_KEY",
                        settings.gateway_client_key_file or settings.keys_dir / "gateway_client_ed25519")


def gateway_host_public_key(settings: Settings) -> str:
    """The public half of the gateway's SSH host key as one OpenSSH line; "" when this API is not told it
    (clients then fall back to trusting the gateway's key on first use)."""
    return _public_half(settings.gateway_host_public_key, "ORZ_GATEWAY_HOST_PUBLIC_KEY",
                        settings.gateway_host_key_file or settings.keys_dir / "gateway_host_ed25519")
