"""Which repository URLs a session may clone: the same rule for every provider.

Refused unless an admin allows them: hosts that are (or resolve to) loopback, link-local, private or
otherwise non-public addresses (``ORZ_REPO_ALLOW_HOSTS``), and ``file://`` paths outside the directories
in ``ORZ_REPO_FILE_DIRS`` or inside the server's data dir (never allowed). Nothing is ever connected to
here, and every refusal of a host reads the same, so the answer tells nothing about open ports.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from api.errors import ValidationFailed
from api.settings import Settings

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[list[str]]]
RESOLVE_TIMEOUT_S = 3.0
_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@(?P<host>[A-Za-z0-9.-]+):")

# One sentence whatever the host resolved to (the server's log says): it tells no one what the operator's
# DNS knows.
HOST_REFUSED = ("repo_url must point to a public git server (an admin can allow other hosts with "
                "ORZ_REPO_ALLOW_HOSTS)")
FILE_REFUSED = ("file:// repositories are allowed only from the directories an admin names in "
                "ORZ_REPO_FILE_DIRS, and never from the server's data directory")


class RepoUrlRefused(ValidationFailed):
    code = "repo_url_refused"


async def system_resolver(host: str) -> list[str]:
    """Every address ``host`` resolves to (empty when it does not resolve: the clone reports that)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def repo_host(url: str) -> str | None:
    """The host a repository URL connects to; None for file:// URLs."""
    if url.startswith("file://"):
        return None
    scp = _SCP_LIKE.match(url)
    if scp:
        return scp.group("host").lower()
    return (urlsplit(url).hostname or "").lower()


def file_repo_path(url: str) -> Path | None:
    """The resolved local path of a file:// URL, else None."""
    if not url.startswith("file://"):
        return None
    return Path(unquote(urlsplit(url).path) or "/").resolve()


# IPv6 prefixes whose last 32 bits are an IPv4 address something on the path delivers to: NAT64's
# well-known prefix (a NAT64 gateway, as clouds' IPv6-only subnets have, forwards to that IPv4 address,
# private ones included) and the deprecated IPv4-compatible form. Python's table calls them global; they
# are judged by the IPv4 address they carry.
_CARRY_IPV4 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))
# Never a public host, whatever Python's table says: NAT64's local-use prefix (its own network's
# translator, any embedding) and the deprecated site-local range, still routed inside some networks.
_LOCAL_IPV6 = (ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"))


def _not_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _LOCAL_IPV6):
            return True
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:  # 2002::/16: a 6to4 relay sends it to the IPv4 address inside
            ip = ip.sixtofour
        elif any(ip in net for net in _CARRY_IPV4):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return not ip.is_global or ip.is_multicast


def all_public(addresses: list[str]) -> bool:
    """Whether every address is public by this module's rule (none only an admin's allow-list let through)."""
    return bool(addresses) and not any(_not_public(a) for a in addresses)


def _allowed(host: str, addresses: list[str], allowed: tuple[str, ...]) -> bool:
    if host in allowed:
        return True
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue
    return bool(addresses) and all(
        any(ipaddress.ip_address(a.split("%", 1)[0]) in net for net in networks) for a in addresses)


def check_file_url(path: Path, settings: Settings) -> None:
    data_dir = settings.data_dir.resolve()
    inside = any(path.is_relative_to(d) for d in settings.repo_allowed_file_dirs())
    if not inside or path.is_relative_to(data_dir):
        raise RepoUrlRefused(FILE_REFUSED)


async def check_repo_url(url: str, settings: Settings, resolve: Resolver = system_resolver) -> None:
    """Raise RepoUrlRefused (422) unless this URL may be cloned by a session."""
    path = file_repo_path(url)
    if path is not None:
        check_file_url(path, settings)
        return
    host = repo_host(url) or ""
    addresses, ok = await checked_addresses(host, settings.repo_allowed_hosts(), resolve)
    if not ok:
        log.info("repo_url host %s refused: it resolves to %s, not all public", host, ", ".join(addresses),
                 extra={"event": "repo_url_refused"})
        raise RepoUrlRefused(HOST_REFUSED)


async def checked_addresses(host: str, allowed: tuple[str, ...], resolve: Resolver = system_resolver
                            ) -> tuple[list[str], bool]:
    """The addresses ``host`` stands for, and whether the rule admits them: all public, or ``host`` (or
    every address) in ``allowed`` (host names, addresses, CIDRs). Also the webhooks' rule (api/webhooks)."""
    try:
        addresses = [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            addresses = ["127.0.0.1"]
        else:
            addresses = await resolve(host)
    ok = not any(_not_public(a) for a in addresses) or _allowed(host, addresses, allowed)
    return addresses, ok
