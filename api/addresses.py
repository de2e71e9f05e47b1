"""A client's address behind trusted proxies (X-Forwarded-For believed only from them): the API's
sign-in limit and the gateway's web door count attempts per address with it."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not one (read from the right: entries left of it could be forged)."""
    if not trusted or not forwarded_for or not within(peer, trusted):
        return peer
    for entry in reversed(forwarded_for.split(",")):
        entry = entry.strip()
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            return peer  # a malformed chain proves nothing
        if not within(str(address), trusted):
            return str(address)
    return peer


def within(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` is in one of ``networks`` (False for anything that is not an address). An
    IPv4-mapped IPv6 address (``::ffff:10.0.0.1``: an IPv4 peer of a listener on ``::``) is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


# One IPv6 client holds a whole /64 (SLAAC, privacy addresses, any host's routed prefix): counted per
# address, it could spend every per-address limit 2^64 times over.
IPV6_LIMIT_PREFIX = 64


def limit_key(source: str) -> str:
    """What per-address limits count ``source`` under: an IPv4 address as itself (also when written as an
    IPv4-mapped IPv6 address), an IPv6 address as its /64; anything that is not an address unchanged."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return source
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_LIMIT_PREFIX}", strict=False))
    return str(ip)
