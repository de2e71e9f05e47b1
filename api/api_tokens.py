"""A user's API tokens: list them, mint one for automation, revoke one (a lost laptop, a leaked CI secret).

Only a token's lookup prefix and hash are stored (api/db/tokens.py); its value is shown once, by create.
Revoking a sign-in's token revokes its refresh tokens with it, as logging out does, so that the sign-in
cannot mint a new one. The API's principal cache keeps a revoked token working on other replicas for
up to ``auth_cache_ttl_s``; the replica that revokes it forgets it at once (the route does).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.auth import Principal
from api.db import tokens
from api.db.base import utcnow
from api.db.models import ApiToken, RefreshToken, User
from api.errors import Conflict, NotFound, Unauthorized

# Enough for every laptop and pipeline a person has; a script minting in a loop is stopped here.
MAX_ACTIVE_TOKENS = 50


@dataclass(frozen=True)
class Minted:
    row: ApiToken
    value: str  # shown to the caller once


def _active() -> tuple[ColumnElement[bool], ...]:
    """Where-clauses of a token that still works: not revoked, not expired."""
    return ApiToken.revoked_at.is_(None), or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > utcnow())


def _shown(token_id: str) -> str:
    """An id or prefix as typed, for an error; clipped, since a caller may have pasted a token's value."""
    return token_id if len(token_id) <= len(tokens.API_TOKEN_PREFIX) + tokens.LOOKUP_CHARS + 16 else (
        token_id[:len(tokens.API_TOKEN_PREFIX) + tokens.LOOKUP_CHARS] + "...")


async def revoke_family(db: AsyncSession, family_id: str) -> None:
    """Revoke every refresh token of one sign-in and the API tokens they issued."""
    now = utcnow()
    token_ids = list(await db.scalars(select(RefreshToken.api_token_id).where(RefreshToken.family_id == family_id)))
    await db.execute(update(RefreshToken).where(RefreshToken.family_id == family_id,
                                                RefreshToken.revoked_at.is_(None)).values(revoked_at=now))
    ids = [t for t in token_ids if t]
    if ids:
        await db.execute(update(ApiToken).where(ApiToken.id.in_(ids), ApiToken.revoked_at.is_(None))
                         .values(revoked_at=now))
    await db.commit()


async def revoke_row(db: AsyncSession, row: ApiToken) -> None:
    """Revoke one API token and, for a sign-in's token, the sign-in (its refresh tokens)."""
    family = await db.scalar(select(RefreshToken.family_id).where(RefreshToken.api_token_id == row.id))
    row.revoked_at = row.revoked_at or utcnow()
    await db.commit()
    if family is not None:
        await revoke_family(db, family)


async def list_tokens(sessions: async_sessionmaker[AsyncSession], user_id: str) -> list[ApiToken]:
    """The user's tokens that still work, oldest first."""
    async with sessions() as db:
        return list(await db.scalars(select(ApiToken).where(ApiToken.user_id == user_id, *_active())
                                     .order_by(ApiToken.created_at, ApiToken.id)))


async def create_token(sessions: async_sessionmaker[AsyncSession], who: Principal, name: str,
                       expires_in_days: int | None) -> Minted:
    async with sessions() as db:
        # A write first, on the user's row: it holds PostgreSQL's row lock and SQLite's write lock until
        # the commit, so concurrent mints count one after another instead of all seeing room for one more.
        await db.execute(update(User).where(User.id == who.user_id).values(id=User.id))
        # Asked again under that lock, not taken from the principal (which a replica's cache trusts for a
        # while): a token revoked, or its owner disabled, a moment ago mints nothing that would outlive it.
        caller = (await db.execute(select(User.is_active, and_(*_active()).label("works"))
                                   .join(ApiToken, ApiToken.user_id == User.id)
                                   .where(User.id == who.user_id, ApiToken.id == who.token_id))).first()
        if caller is not None and not caller.is_active:
            raise Unauthorized("this account is disabled")
        if caller is None or not caller.works:
            raise Unauthorized("invalid or revoked API token")
        active = await db.scalar(select(func.count()).select_from(ApiToken).where(
            ApiToken.user_id == who.user_id, *_active())) or 0
        if active >= MAX_ACTIVE_TOKENS:
            raise Conflict(f"you have {active} API tokens, the most one person may hold; revoke one first "
                           "(orz cloud api-token list, then revoke ID)")
        issued = tokens.issue(tokens.API_TOKEN_PREFIX)
        expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
        row = ApiToken(user_id=who.user_id, name=name, prefix=issued.prefix, token_hash=issued.digest,
                       expires_at=expires, source="api")
        db.add(row)
        await db.commit()
        await db.refresh(row)
        return Minted(row=row, value=issued.value)


async def revoke_token(sessions: async_sessionmaker[AsyncSession], who: Principal, token_id: str) -> ApiToken:
    """Revoke one of the caller's own tokens, by id or prefix, or by its name when no other of theirs has it;
    another user's is not found (not forbidden: its existence is not the caller's to learn)."""
    async with sessions() as db:
        mine = (ApiToken.user_id == who.user_id, *_active())
        row = await db.scalar(select(ApiToken).where(
            *mine, or_(ApiToken.id == token_id, ApiToken.prefix == token_id)))
        if row is None:
            named = list(await db.scalars(select(ApiToken).where(*mine, ApiToken.name == token_id)
                                          .order_by(ApiToken.created_at, ApiToken.id).limit(MAX_ACTIVE_TOKENS)))
            if len(named) > 1:
                raise Conflict(f"you have {len(named)} API tokens named {_shown(token_id)} "
                               f"({', '.join(r.id for r in named)}); revoke takes an ID or PREFIX to say which: "
                               f"orz cloud api-token revoke {named[0].id}")
            row = named[0] if named else None
        if row is None:
            raise NotFound(f"you have no API token {_shown(token_id)} (orz cloud api-token list shows yours)")
        await revoke_row(db, row)
        return row


async def revoke_any(sessions: async_sessionmaker[AsyncSession], token_id: str) -> tuple[ApiToken, str]:
    """An operator's revocation (`orz admin revoke-token`): any user's token by id or prefix, and its owner's
    email."""
    async with sessions() as db:
        found = (await db.execute(select(ApiToken, User.email).join(User, User.id == ApiToken.user_id).where(
            or_(ApiToken.id == token_id, ApiToken.prefix == token_id), ApiToken.revoked_at.is_(None)))).first()
        if found is None:
            raise NotFound(f"no API token {_shown(token_id)} that is not revoked already")
        row, email = found
        await revoke_row(db, row)
        return row, email


async def tokens_of(sessions: async_sessionmaker[AsyncSession], email: str) -> list[ApiToken]:
    """An operator's view of one user's working tokens (`orz admin list-tokens`)."""
    async with sessions() as db:
        user = await db.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            raise NotFound(f"no such user: {email}")
    return await list_tokens(sessions, user.id)
