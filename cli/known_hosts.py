"""The gateway's host key, pinned in the CLI's own known_hosts from what the API says.

The API hands the key over in each attach grant, on the channel the user already trusts with their token,
so ssh's first connection checks it instead of trusting whatever answers (`StrictHostKeyChecking
accept-new` then only applies to a server that publishes no key). The API is authoritative: when it names
another key (the operator rotated it), that replaces the pinned one; lines for other hosts are kept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from api import public_keys
from api.gateway_keys import known_hosts_name
from cli.errors import CliError
from cli.ssh_config import checked_endpoint


def _names_match(field: str, name: str) -> bool:
    """Whether a known_hosts host field (plain names, comma-separated, or one hashed `|1|salt|hash`) is name."""
    if field.startswith("|1|"):
        try:
            _, _, salt, digest = field.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except ValueError:
            return False
    return name in field.split(",")


def lines_for(host: str, port: int, keys: list[str]) -> list[str]:
    """known_hosts lines for host:port, rebuilt from the API's answer so that nothing else can ride along."""
    host, port = checked_endpoint(host, port)  # a DNS name or an address: nothing known_hosts would read as more
    name = known_hosts_name(host, port)
    try:
        return [f"{name} {public_keys.to_openssh_line(key, source='the gateway host key from the API')}"
                for key in keys]
    except public_keys.PublicKeyError as exc:
        raise CliError(f"{exc}; the server's ORZ_GATEWAY_HOST_PUBLIC_KEY needs fixing (ask its admin)") from exc


def pin(path: Path, host: str, port: int, keys: list[str]) -> bool:
    """Make `keys` the only keys known for host:port in `path`; False (nothing written) when there are none."""
    if not keys:
        return False
    lines = lines_for(host, port, keys)
    name = known_hosts_name(host, port)
    try:
        current = path.read_text().splitlines()
    except FileNotFoundError:
        current = []
    kept = [line for line in current
            if not (line.split() and not line.startswith("@") and _names_match(line.split()[0], name))]
    text = "\n".join([*kept, *lines]) + "\n"
    if current and "\n".join(current) + "\n" == text:
        return True
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return True
