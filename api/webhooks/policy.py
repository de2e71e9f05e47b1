"""Which URLs a webhook may POST to: https, the repo URLs' private-address rule, and never this server itself.

Checked when the webhook is created and again before every attempt, whose connection then goes to the
addresses that were checked (a name that resolves elsewhere by the time of sending is not followed).

Every refusal that depends on the network or the operator's settings (a private address, a name that does
not resolve, plain http to a host not allowed, this server's own doors) reads the same, REFUSED: the
answer must not tell a caller which names the operator's DNS knows or where they point. The reason is
logged (host and port, never the URL, whose path may be a secret).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from api.errors import ValidationFailed
from api.instances import repo_policy
from api.settings import Settings

log = logging.getLogger(__name__)

# True for a public name the server's DNS fails on, too: it says the server must resolve it.
REFUSED = ("cannot deliver to this URL: it must be a public https:// address this server can resolve (an admin "
           "can allow other hosts with ORZ_WEBHOOK_ALLOW_HOSTS)")

# Why a URL was refused, for the server's log only.
PLAIN_HTTP = "plain http to a host not allowed"
NOT_PUBLIC = "a loopback, link-local or private address"
UNRESOLVED = "the host does not resolve"
SELF = "this server itself ({setting} is {url})"


class WebhookUrlRefused(ValidationFailed):
    code = "webhook_url_refused"


def _refused(host: str, port: int, reason: str) -> WebhookUrlRefused:
    log.info("webhook URL to %s port %d refused: %s", host, port, reason,
             extra={"event": "webhook_url_refused", "reason": reason})
    return WebhookUrlRefused(REFUSED)


@dataclass(frozen=True)
class Target:
    """Where one attempt connects: the URL's host and port, and the checked addresses to use."""

    scheme: str
    host: str
    port: int
    addresses: list[str]


def _allowed_host(host: str, allowed: tuple[str, ...]) -> bool:
    if host in allowed:
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def parse(url: str, settings: Settings) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL shape; raises WebhookUrlRefused (422) otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookUrlRefused("the webhook URL is not a valid URL") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise WebhookUrlRefused("the webhook URL must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlRefused("the webhook URL must not carry a user name or password")
    port = port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "http" and not _allowed_host(host, settings.webhook_allowed_hosts()):
        raise _refused(host, port, PLAIN_HTTP)
    return parts.scheme, host, port


async def check(url: str, settings: Settings, resolve: repo_policy.Resolver = repo_policy.system_resolver
                ) -> Target:
    """The URL's target with the addresses it may connect to; WebhookUrlRefused when the rule says no.

    A host that does not resolve is refused too (at creation a typo; at delivery time the attempt fails
    and is retried, like every refused attempt). Each refusal reads the same (REFUSED)."""
    scheme, host, port = parse(url, settings)
    addresses, ok = await repo_policy.checked_addresses(host, settings.webhook_allowed_hosts(), resolve)
    await _refuse_self(host, port, addresses, settings, resolve)
    if not ok:
        raise _refused(host, port, NOT_PUBLIC)
    if not addresses:
        raise _refused(host, port, UNRESOLVED)
    return Target(scheme, host, port, addresses)


def own_urls(settings: Settings) -> list[tuple[str, str]]:
    """This server's HTTP doors as (setting, URL): what a webhook must never point at."""
    return [("ORZ_PUBLIC_API_URL", settings.public_api_url), ("ORZ_INTERNAL_API_URL", settings.internal_api_url),
            ("ORZ_PUBLIC_WEB_URL", settings.web_base_url())]


def _same_address(address: str) -> str:
    """One spelling per address (no zone; an IPv4-mapped IPv6 address as the IPv4 one)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


async def _refuse_self(host: str, port: int, addresses: list[str], settings: Settings,
                       resolve: repo_policy.Resolver) -> None:
    """WebhookUrlRefused when host:port is one of this server's doors: the same name, or a name for the same
    address (resolved the same way), on the same port. Checked whatever ORZ_WEBHOOK_ALLOW_HOSTS allows."""
    mine = {_same_address(a) for a in addresses}
    for setting, url in own_urls(settings):
        try:
            own = urlsplit(url)
            own_port = own.port or {"https": 443, "wss": 443}.get(own.scheme, 80)
        except ValueError:
            continue
        own_host = (own.hostname or "").lower()
        if not own_host or own_port != port:
            continue
        if own_host != host:
            own_addresses, _ = await repo_policy.checked_addresses(own_host, (), resolve)
            if not mine & {_same_address(a) for a in own_addresses}:
                continue
        raise _refused(host, port, SELF.format(setting=setting, url=url))
