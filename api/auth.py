"""Who is calling: API tokens for users, the service token for the gateway, runner tokens for runners."""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db import tokens
from api.db.base import utcnow
from api.db.models import ApiToken, Org, User
from api.errors import Unauthorized

# Columns, not ORM objects: every request with a token not in the cache runs this, and loading three
# mapped objects cost more than the query itself.
_TOKEN_LOOKUP = (
    select(ApiToken.id.label("token_id"), ApiToken.token_hash, ApiToken.revoked_at, ApiToken.expires_at,
           ApiToken.last_used_at, ApiToken.source, User.id.label("user_id"), User.email, User.role, User.is_active,
           Org.id.label("org_id"), Org.name.label("org_name"), Org.plan)
    .join(User, User.id == ApiToken.user_id)
    .join(Org, Org.id == User.org_id)
    .where(ApiToken.prefix == bindparam("prefix"))
)

# Writing last_used_at on every request would turn each read into a write; once a minute is plenty.
LAST_USED_GRANULARITY = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """An authenticated user and the org every query of theirs is scoped to."""

    user_id: str
    email: str
    role: str
    org_id: str
    org_name: str
    plan: str
    # How the token was obtained: "token" (minted by an admin), "github", "oidc:<name>".
    source: str = "token"
    # The API token the caller presented (its row id): what mints a new one must still work when it does.
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        """Org admins see and manage every session of their org; members only their own."""
        return self.role == "admin"

    @property
    def actor(self) -> str:
        """How audit events name this caller: the user id, which (unlike an email) never changes."""
        return f"user:{self.user_id}"


class PrincipalCache:
    """Recently verified API tokens, so a burst of requests does not re-run the token query each time.

    Keyed by the token's SHA-256, never the token. Entries live ``ttl_s`` seconds: revoking a token or
    disabling a user takes effect on the API within that time (attach authorization is never cached).
    """

    def __init__(self, ttl_s: float = 1.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, token_digest: str) -> Principal | None:
        hit = self._entries.get(token_digest)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            self._entries.pop(token_digest, None)
            return None
        return hit[1]

    def forget(self, token_digest: str) -> None:
        """Drop a token at once (logout), instead of trusting it for the rest of ``ttl_s``."""
        self._entries.pop(token_digest, None)

    def put(self, token_digest: str, who: Principal) -> None:
        if self.ttl_s <= 0:
            return
        self._entries[token_digest] = (time.monotonic() + self.ttl_s, who)
        self._entries.move_to_end(token_digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    # Every token of ours is printable ASCII; other bytes arrive as surrogates that no hash or comparison takes.
    if scheme.lower() != "bearer" or not value or not value.isascii() or not value.isprintable():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return value


async def authenticate_api_token(sessions: async_sessionmaker[AsyncSession], value: str,
                                 cache: PrincipalCache | None = None) -> Principal:
    invalid = Unauthorized("invalid or revoked API token")
    if not tokens.looks_like(value, tokens.API_TOKEN_PREFIX):
        raise invalid
    token_digest = tokens.digest(value)
    if cache is not None and (cached := cache.get(token_digest)) is not None:
        return cached
    async with sessions() as db:
        row = (await db.execute(_TOKEN_LOOKUP, {"prefix": tokens.lookup_prefix(value)})).first()
        if row is None:
            raise invalid
        now = utcnow()
        if not tokens.matches(value, row.token_hash):
            raise invalid
        # Before the revocation check: disabling a user revokes their tokens, and the holder of one
        # (it matched) should read why it stopped working.
        if not row.is_active:
            raise Unauthorized("this account is disabled")
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            raise invalid
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_GRANULARITY:
            await db.execute(update(ApiToken).where(ApiToken.id == row.token_id).values(last_used_at=now))
            await db.commit()
        who = Principal(
            user_id=row.user_id, email=row.email, role=row.role,
            org_id=row.org_id, org_name=row.org_name, plan=row.plan, source=row.source or "token",
            token_id=row.token_id,
        )
    if cache is not None:
        cache.put(token_digest, who)
    return who


def check_service_token(expected: str, presented: str) -> None:
    """The gateway's token; an unset expected token refuses everyone."""
    if not expected or not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Unauthorized("invalid service token")
