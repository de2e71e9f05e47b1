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
    """Whether ``address`` is in one of ``networks`` (False for anything that is not an address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)
