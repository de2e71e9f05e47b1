"""Talking to providers: JSON answers, failures as IdentityProviderError without echoing secrets."""

from __future__ import annotations

from typing import Any

import httpx

from api.errors import AccessDenied, AuthorizationPending, ExpiredToken, IdentityProviderError, InvalidGrant, SlowDown

TIMEOUT_S = 10.0

# RFC 8628 3.5 errors of the provider's token endpoint, as this API's own.
DEVICE_ERRORS = {
    "authorization_pending": AuthorizationPending,
    "slow_down": SlowDown,
    "expired_token": ExpiredToken,
    "access_denied": AccessDenied,
    "invalid_grant": InvalidGrant,
    "bad_verification_code": InvalidGrant,  # GitHub's name for an unknown or spent device code
}


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT_S, headers={"Accept": "application/json",
                                                         "User-Agent": "orzbob-cloud"})


async def request_json(client: httpx.AsyncClient, method: str, url: str, *, what: str,
                       ok_statuses: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
    """The JSON body of a provider's answer; a transport failure or an unexpected status is a 502 that
    names what was asked (never the body, which may hold a code or token)."""
    try:
        response = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        raise IdentityProviderError(f"cannot reach the identity provider for {what}",
                                    internal=f"{what}: {type(exc).__name__} for {url}") from None
    if response.status_code not in ok_statuses:
        # 401 is the provider refusing the server's own client credentials (RFC 6749 5.2 invalid_client):
        # the one cause an admin can fix, so the answer names it.
        hint = ("; it did not accept this server's client id and secret (an admin checks the sign-in settings)"
                if response.status_code == 401 else "")
        raise IdentityProviderError(f"the identity provider answered {response.status_code} to {what}{hint}",
                                    internal=f"{what}: HTTP {response.status_code} from {url}")
    try:
        return response.json()
    except ValueError:
        raise IdentityProviderError(f"the identity provider's answer to {what} is not JSON") from None


def raise_device_error(body: dict[str, Any], interval: int | None = None) -> None:
    """Raise the API error for an RFC 8628 error answer; unknown errors are the provider's fault."""
    error = str(body.get("error") or "")
    cls = DEVICE_ERRORS.get(error)
    if cls is None:
        raise IdentityProviderError(f"the identity provider refused the device grant ({error[:64] or 'no error'})")
    if cls is SlowDown:
        raise SlowDown("polling too fast; wait longer between polls", interval=interval)
    raise cls()
