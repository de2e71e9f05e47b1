"""Which user an identity signs in as: linked identities, the email an admin created, or a new user,
within the allowed email domains and GitHub orgs (ORZ_SIGNIN_*)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.db.base import utcnow
from api.db.models import Org, User, UserIdentity
from api.errors import ApprovalPending, IdentityProviderError, SignInRefused
from api.settings import Settings
from api.signin.identity import Identity


def check_rules(settings: Settings, identity: Identity) -> None:
    """The allowed domains and GitHub orgs; raises SignInRefused naming the rule."""
    if identity.email is None:
        raise SignInRefused("the identity provider gave no verified email address")
    domains = settings.signin_domains()
    domain = identity.email.rsplit("@", 1)[-1]
    if domains and domain not in domains:
        raise SignInRefused(f"sign-in is limited to email addresses at {', '.join(domains)}")
    orgs = settings.signin_orgs()
    in_org = identity.orgs is not None and bool(set(identity.orgs) & set(orgs))
    if orgs and identity.provider_key == "github" and not in_org:
        raise SignInRefused(f"sign-in with GitHub is limited to members of {', '.join(orgs)}")
    teams = settings.signin_teams()
    on_team = identity.teams is not None and bool(set(identity.teams) & set(teams))
    if teams and identity.provider_key == "github" and not on_team:
        raise SignInRefused(f"sign-in with GitHub is limited to the teams {', '.join(teams)}")


def _check_user(user: User) -> None:
    if user.approval_pending:
        raise ApprovalPending(f"{user.email} is waiting for an admin's approval (orz admin approve {user.email})")
    if not user.is_active:
        raise SignInRefused("this account is disabled")


async def user_for(db: AsyncSession, settings: Settings, identity: Identity) -> User:
    """The user this identity signs in as, creating (or queueing for approval) a first sign-in."""
    check_rules(settings, identity)
    assert identity.email is not None
    now = utcnow()
    link = await db.scalar(select(UserIdentity).where(UserIdentity.provider == identity.provider_key,
                                                      UserIdentity.subject == identity.subject))
    if link is not None:
        user = await db.get(User, link.user_id)
        assert user is not None
        link.last_signin_at, link.email, link.login = now, identity.email, identity.login
        await db.commit()
        _check_user(user)
        return user
    user = await db.scalar(select(User).where(User.email == identity.email))
    if user is None:
        if settings.signin_new_users == "refuse":
            raise SignInRefused(f"no user {identity.email} on this server; ask an admin to create one")
        org = await db.scalar(select(Org).where(Org.name == settings.signin_org))
        if org is None:
            raise IdentityProviderError(f"ORZ_SIGNIN_ORG names org {settings.signin_org!r}, which does not exist",
                                        internal="create it with orz admin create-org")
        pending = settings.signin_new_users == "pending"
        user = User(email=identity.email, org_id=org.id, role="member", is_active=not pending,
                    approval_pending=pending)
        db.add(user)
        await db.flush()
    db.add(UserIdentity(user_id=user.id, provider=identity.provider_key, subject=identity.subject,
                        email=identity.email, login=identity.login, last_signin_at=now))
    try:
        await db.commit()
    except IntegrityError:  # the same first sign-in twice at once: the other one linked it
        await db.rollback()
        return await user_for(db, settings, identity)
    _check_user(user)
    return user
