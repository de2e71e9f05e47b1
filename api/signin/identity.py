"""What a provider tells us about the person signing in, and the upstream device authorization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Identity:
    """A verified account at a provider. ``email`` is only set when the provider vouches for it."""

    provider_key: str  # "github" or "oidc:<issuer>": with subject, the account's identity
    source: str  # what `orz cloud whoami` shows: "github", "oidc:<name>"
    subject: str
    email: str | None
    login: str | None = None
    # GitHub org logins (lower case) when the provider was asked for them; None when not known.
    orgs: tuple[str, ...] | None = None
    # GitHub teams as "org/team-slug" (lower case) when the rules need them; None when not known.
    teams: tuple[str, ...] | None = None


@dataclass(frozen=True)
class UpstreamDevice:
    """The provider's answer to a device authorization request (RFC 8628 3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


class DeviceProvider(Protocol):
    name: str  # "oidc" or "github": how the API and the CLI name it

    @property
    def source(self) -> str: ...

    async def start_device(self) -> UpstreamDevice: ...

    async def poll_device(self, device_code: str) -> Identity:
        """The identity once the person approved; raises AuthorizationPending, SlowDown, ExpiredToken,
        AccessDenied (api.errors) meanwhile or otherwise."""
        ...
