"""Bearer tokens (API and runner): random, shown once, stored as a prefix plus a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

API_TOKEN_PREFIX = "orz_"  # noqa: S105  # nosec B105  # a public marker, not a secret
RUNNER_TOKEN_PREFIX = "orzr_"  # noqa: S105  # nosec B105  # a public marker, not a secret
# Characters of the token (after its kind prefix) stored in clear for lookup.
LOOKUP_CHARS = 8


@dataclass(frozen=True)
class IssuedToken:
    """A freshly minted token: `value` goes to the caller once; `prefix` and `digest` are stored."""

    value: str
    prefix: str
    digest: str


def issue(kind_prefix: str = API_TOKEN_PREFIX) -> IssuedToken:
    value = kind_prefix + secrets.token_urlsafe(32)
    return IssuedToken(value=value, prefix=lookup_prefix(value), digest=digest(value))


def lookup_prefix(value: str) -> str:
    head, _, rest = value.partition("_")
    return f"{head}_{rest[:LOOKUP_CHARS]}"


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def matches(value: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(value), stored_digest)


def looks_like(value: str, kind_prefix: str) -> bool:
    return value.startswith(kind_prefix) and len(value) > len(kind_prefix) + LOOKUP_CHARS
