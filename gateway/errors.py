"""Typed gateway errors. Each carries the one line the SSH user reads; internals go to logs only."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of the gateway's errors; ``line`` is safe to show the connecting user."""

    code: str = "gateway_error"

    def __init__(self, line: str, *, internal: str | None = None) -> None:
        super().__init__(line)
        self.line = line
        self.internal = internal


class CredentialRejected(GatewayError):
    """The certificate or token failed local verification (signature, expiry, session)."""

    code = "credential_rejected"


class CredentialsUnavailable(GatewayError):
    """The gateway cannot check credentials (its trust anchors did not load): our failure, not the user's."""

    code = "credentials_unavailable"


# Refusals that answer a guess (is there such a session, is it mine): what the failed-authentication
# limit per source address is for. A failed session, an outage or a quota guesses nothing, and counting
# them would lock out everyone behind the address (an office's NAT) after a few retries.
GUESS_CODES = frozenset({"unauthorized", "forbidden", "not_found"})


class AttachRefused(GatewayError):
    """The API refused the attach (no such session, not yours, failed, quota...)."""

    def __init__(self, line: str, *, code: str = "refused", internal: str | None = None) -> None:
        super().__init__(line, internal=internal)
        self.code = code

    @property
    def counts_against_source(self) -> bool:
        return self.code in GUESS_CODES


class ApiUnavailable(AttachRefused):
    """The API gave no answer (unreachable, or a 5xx): nothing was decided about this user."""


class UpstreamUnavailable(GatewayError):
    """The session's runner could not be reached or rejected the gateway."""

    code = "upstream_unavailable"
