"""Who is calling: API tokens for users, the service token for the gateway, runner tokens for runners."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db import tokens
from api.db.base import utcnow
from api.db.models import ApiToken, Org, User
from api.errors import Unauthorized

# Writing last_used_at on every request would turn each read into a write; once a minute is plenty.
LAST_USED_GRANULARITY = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """An authenticated user and the org every query of theirs is scoped to."""

    user_id: str
    email: str
    is_admin: bool
    org_id: str
    org_name: str
    plan: str

    @property
    def actor(self) -> str:
        return f"user:{self.user_id}"


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return value.strip()


async def authenticate_api_token(sessions: async_sessionmaker[AsyncSession], value: str) -> Principal:
    invalid = Unauthorized("invalid or revoked API token")
    if not tokens.looks_like(value, tokens.API_TOKEN_PREFIX):
        raise invalid
    async with sessions() as db:
        row = (
            await db.execute(
                select(ApiToken, User, Org)
                .join(User, User.id == ApiToken.user_id)
                .join(Org, Org.id == User.org_id)
                .where(ApiToken.prefix == tokens.lookup_prefix(value))
            )
        ).first()
        if row is None:
            raise invalid
        token, user, org = row
        now = utcnow()
        if (
            not tokens.matches(value, token.token_hash)
            or token.revoked_at is not None
            or (token.expires_at is not None and token.expires_at <= now)
        ):
            raise invalid
        if not user.is_active:
            raise Unauthorized("this account is disabled")
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_GRANULARITY:
            await db.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
            await db.commit()
        return Principal(
            user_id=user.id, email=user.email, is_admin=user.is_admin,
            org_id=org.id, org_name=org.name, plan=org.plan,
        )


def check_service_token(expected: str, presented: str) -> None:
    """The gateway's token; an unset expected token refuses everyone."""
    if not expected or not hmac.compare_digest(expected.encode(), presented.encode()):
        raise Unauthorized("invalid service token")
