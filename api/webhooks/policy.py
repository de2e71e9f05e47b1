"""Which URLs a webhook may POST to: https, and the repo URLs' private-address rule.

Checked when the webhook is created and again before every attempt, whose connection then goes to the
addresses that were checked (a name that resolves elsewhere by the time of sending is not followed).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from api.errors import ValidationFailed
from api.instances import repo_policy
from api.settings import Settings

HOST_REFUSED = ("the webhook URL points to a loopback, link-local or private address; an admin can allow "
                "the host with ORZ_WEBHOOK_ALLOW_HOSTS")
HTTPS_REQUIRED = ("the webhook URL must be https:// (plain http only to hosts an admin allows with "
                  "ORZ_WEBHOOK_ALLOW_HOSTS)")


class WebhookUrlRefused(ValidationFailed):
    code = "webhook_url_refused"


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
    if parts.scheme == "http" and not _allowed_host(host, settings.webhook_allowed_hosts()):
        raise WebhookUrlRefused(HTTPS_REQUIRED)
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


async def check(url: str, settings: Settings, resolve: repo_policy.Resolver = repo_policy.system_resolver
                ) -> Target:
    """The URL's target with the addresses it may connect to; WebhookUrlRefused when the rule says no.

    A host that does not resolve is refused too (at creation a typo; at delivery time the attempt fails
    and is retried)."""
    scheme, host, port = parse(url, settings)
    addresses, ok = await repo_policy.checked_addresses(host, settings.webhook_allowed_hosts(), resolve)
    if not ok:
        raise WebhookUrlRefused(HOST_REFUSED)
    if not addresses:
        raise WebhookUrlRefused(f"the webhook URL's host {host} does not resolve")
    return Target(scheme, host, port, addresses)
