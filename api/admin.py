"""Operator actions behind `orz admin`: orgs, users, tokens and the embedded default's bootstrap."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.db import tokens
from api.db.base import utcnow
from api.db.models import ApiToken, Org, RefreshToken, User
from api.errors import BadRequest, Conflict, NotFound
from api.schemas import ROLES

PLANS = ("free", "pro", "team")
ORG_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}$")


@dataclass(frozen=True)
class Bootstrap:
    org: Org
    user: User
    token: str | None


async def create_org(sessions: async_sessionmaker[AsyncSession], name: str, plan: str = "free") -> Org:
    if not ORG_NAME_RE.match(name):
        raise BadRequest("org names are 1-63 characters of a-z, 0-9 and '-'")
    if plan not in PLANS:
        raise BadRequest(f"plan must be one of {', '.join(PLANS)}")
    async with sessions() as db:
        org = Org(name=name, plan=plan)
        db.add(org)
        try:
            await db.commit()
        except IntegrityError:
            raise Conflict(f"org {name} already exists") from None
        return org


async def set_plan(sessions: async_sessionmaker[AsyncSession], name: str, plan: str) -> Org:
    if plan not in PLANS:
        raise BadRequest(f"plan must be one of {', '.join(PLANS)}")
    return await _update_org(sessions, name, plan=plan)


async def set_recording(sessions: async_sessionmaker[AsyncSession], name: str, enabled: bool) -> Org:
    """Turn the recording of the org's sessions on or off (from each session's next start on)."""
    return await _update_org(sessions, name, recording_enabled=enabled)


async def _update_org(sessions: async_sessionmaker[AsyncSession], name: str, **values: object) -> Org:
    async with sessions() as db:
        org = await db.scalar(select(Org).where(Org.name == name))
        if org is None:
            raise NotFound(f"no such org: {name}")
        for field, value in values.items():
            setattr(org, field, value)
        await db.commit()
        return org


async def create_user(sessions: async_sessionmaker[AsyncSession], email: str, org_name: str,
                      *, role: str = "member") -> User:
    email = email.strip().lower()
    if not EMAIL_RE.match(email):
        raise BadRequest(f"not an email address: {email}")
    _check_role(role)
    async with sessions() as db:
        org = await db.scalar(select(Org).where(Org.name == org_name))
        if org is None:
            raise NotFound(f"no such org: {org_name}")
        user = User(email=email, org_id=org.id, role=role)
        db.add(user)
        try:
            await db.commit()
        except IntegrityError:
            raise Conflict(f"user {email} already exists") from None
        return user


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")


async def set_role(sessions: async_sessionmaker[AsyncSession], email: str, role: str) -> User:
    """Make a user an org admin or a member; the API sees it within its token cache's lifetime."""
    _check_role(role)
    return await _update_user(sessions, email, role=role)


async def _update_user(sessions: async_sessionmaker[AsyncSession], email: str, **values: object) -> User:
    async with sessions() as db:
        user = await db.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            raise NotFound(f"no such user: {email}")
        for name, value in values.items():
            setattr(user, name, value)
        await db.commit()
        return user


async def set_user_active(sessions: async_sessionmaker[AsyncSession], email: str, active: bool) -> User:
    """Disabling also revokes every API and refresh token the user holds: a user is disabled because a
    token leaked or they left, and enabling them again must not bring a leaked token back to life. They
    come back through a new sign-in or a token an admin mints (before or after enabling them)."""
    async with sessions() as db:
        user = await db.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            raise NotFound(f"no such user: {email}")
        user.is_active = active
        if not active:
            now = utcnow()
            for model in (ApiToken, RefreshToken):
                await db.execute(update(model).where(model.user_id == user.id, model.revoked_at.is_(None))
                                 .values(revoked_at=now))
        await db.commit()
        return user


async def approve_user(sessions: async_sessionmaker[AsyncSession], email: str) -> User:
    """Let a person whose first sign-in is waiting for approval in (they sign in again to get a token)."""
    async with sessions() as db:
        user = await db.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            raise NotFound(f"no such user: {email}")
        if not user.approval_pending:
            raise Conflict(f"{user.email} is not waiting for approval"
                           + ("" if user.is_active else " (a disabled user: orz admin enable-user)"))
        user.approval_pending = False
        user.is_active = True
        await db.commit()
        return user


async def pending_users(sessions: async_sessionmaker[AsyncSession]) -> list[User]:
    async with sessions() as db:
        return list(await db.scalars(select(User).where(User.approval_pending.is_(True)).order_by(User.created_at)))


async def create_token(sessions: async_sessionmaker[AsyncSession], email: str, name: str = "default") -> str:
    """Mint an API token for a user and return it; only its prefix and hash are stored."""
    async with sessions() as db:
        user = await db.scalar(select(User).where(User.email == email.strip().lower()))
        if user is None:
            raise NotFound(f"no such user: {email}")
        issued = tokens.issue(tokens.API_TOKEN_PREFIX)
        db.add(ApiToken(user_id=user.id, name=name[:64], prefix=issued.prefix, token_hash=issued.digest))
        await db.commit()
        return issued.value


async def bootstrap(sessions: async_sessionmaker[AsyncSession], org_name: str = "default",
                    email: str = "admin@localhost") -> Bootstrap:
    """First start of the embedded default: an admin org, user and token, once."""
    async with sessions() as db:
        existing = await db.scalar(select(User).where(User.email == email))
        if existing is not None:
            org = await db.get(Org, existing.org_id)
            assert org is not None
            return Bootstrap(org=org, user=existing, token=None)
    org = await create_org(sessions, org_name, "free")
    user = await create_user(sessions, email, org_name, role="admin")
    token = await create_token(sessions, email, name="orz-server")
    return Bootstrap(org=org, user=user, token=token)
