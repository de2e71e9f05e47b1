"""Sign-in as a service: device grants brokered to the provider, API and refresh tokens, revocation."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import ColumnElement, CompoundSelect, delete, func, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import api_tokens
from api.addresses import limit_key
from api.credentials.secrets_box import RowBinding, Sealed, SecretsBox
from api.db import tokens
from api.db.base import utcnow
from api.db.models import ApiToken, DeviceGrant, RefreshToken, SigninState, User, new_id
from api.errors import (
    BadRequest,
    ExpiredToken,
    InvalidGrant,
    NotReady,
    SignInNotConfigured,
    SignInRefused,
    SlowDown,
)
from api.settings import Settings
from api.signin import rules
from api.signin.github import GitHubProvider
from api.signin.http import new_client
from api.signin.identity import DeviceProvider, Identity
from api.signin.oidc import OidcProvider

DEVICE_CODE_PREFIX = "orzd_"
REFRESH_TOKEN_PREFIX = "orzrt_"  # noqa: S105  # nosec B105  # a public marker, not a secret
# RFC 8628 3.5: each slow_down adds 5 seconds to the interval.
SLOW_DOWN_STEP_S = 5
# How long a person may take at the provider's sign-in page.
BROWSER_STATE_TTL_S = 600
# Sign-ins in progress at once (the start routes take no credential): beyond this, the oldest unfinished of
# the address holding the most go.
MAX_PENDING = 10_000
# Sign-ins in progress from one address (an IPv6 client as its /64): beyond this, its own oldest go. A whole
# office behind one NAT rarely has this many people at the provider's page within its 10 minutes.
MAX_PENDING_PER_SOURCE = 50

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceStart:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int
    provider: str


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str | None
    source: str
    user: User
    login: str | None = None
    page_nonce: str | None = None  # a browser sign-in's: what the door's page started it with


def _binding(row_id: str) -> RowBinding:
    # What is sealed (a provider's device code, a PKCE verifier and nonce) is bound to its row: moved to
    # another row it does not open.
    return RowBinding(org_id="-", scope="signin", name=row_id)


class SignInService:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], box: SecretsBox,
                 http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.box = box
        self.http = http or new_client()
        self.providers: dict[str, DeviceProvider] = {}
        configured = settings.signin_providers()
        if "oidc" in configured:
            self.providers["oidc"] = OidcProvider(settings, self.http)
        if "github" in configured:
            github = self.providers["github"] = GitHubProvider(settings, self.http)
            if not github.web_flow:
                log.warning("GitHub sign-in has no ORZ_GITHUB_CLIENT_SECRET: the Go CLI's POST /v1/auth/exchange "
                            "cannot ask GitHub whether a token is this app's, so a GitHub token any other app "
                            "obtained signs its owner in here; set the secret (docs/sign-in.md)")
        for problem in half_configured(settings):
            log.warning("%s", problem)

    async def aclose(self) -> None:
        await self.http.aclose()

    def provider(self, name: str | None) -> DeviceProvider:
        if not self.providers:
            raise SignInNotConfigured("this server has no identity provider configured; log in with a token "
                                      "(orz cloud login --with-token) that an admin mints with `orz admin "
                                      "create-token EMAIL` (on your own orz server: it saved your login at its "
                                      "first start), or see docs/sign-in.md")
        if name is None:
            return next(iter(self.providers.values()))
        found = self.providers.get(name)
        if found is None:
            raise SignInNotConfigured(f"sign-in with {name} is not configured here "
                                      f"(configured: {', '.join(self.providers)})")
        return found

    @property
    def github(self) -> GitHubProvider:
        found = self.providers.get("github")
        if not isinstance(found, GitHubProvider):
            raise SignInNotConfigured("sign-in with GitHub is not configured on this server")
        return found

    # -- the device grant --------------------------------------------------------------------------

    async def start_device(self, provider_name: str | None, source: str | None = None) -> DeviceStart:
        """A device sign-in; ``source``: the caller's address (its share of the sign-ins in progress)."""
        provider = self.provider(provider_name)
        key = _source_key(source)
        await self._make_room(key)  # before the provider is asked for anything
        upstream = await provider.start_device()
        issued = tokens.issue(DEVICE_CODE_PREFIX)
        expires_in = max(1, min(upstream.expires_in, self.settings.signin_device_ttl_s))
        grant_id = new_id("dev")
        sealed = self.box.seal(upstream.device_code.encode(), _binding(grant_id))
        async with self.sessions() as db:
            db.add(DeviceGrant(id=grant_id, prefix=issued.prefix, token_hash=issued.digest, provider=provider.name,
                               key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext,
                               interval_s=max(1, upstream.interval), source=key,
                               expires_at=utcnow() + timedelta(seconds=expires_in)))
            await db.commit()
        return DeviceStart(device_code=issued.value, user_code=upstream.user_code,
                           verification_uri=upstream.verification_uri,
                           verification_uri_complete=upstream.verification_uri_complete,
                           expires_in=expires_in, interval=max(1, upstream.interval), provider=provider.name)

    async def _make_room(self, source: str | None) -> None:
        async with self.sessions() as db:
            await self._purge(db, source)
            await db.commit()

    async def _purge(self, db: AsyncSession, source: str | None) -> None:
        """Sign-ins nobody finished, and redeemed device codes, once they have expired (each start
        sweeps, so the tables hold at most the sign-ins of the last few minutes). The start routes are open to
        anyone, so what is in progress is bounded twice: ``source`` (the address starting one more) keeps at
        most MAX_PENDING_PER_SOURCE, its own oldest going first; and at MAX_PENDING in all, the oldest sign-ins
        of the address holding the most make room for the new one. Refusing instead let a flood keep everyone
        out for as long as it went on, and dropping everyone's oldest let one address end everyone else's
        sign-ins; this way a flood only ends its own attempts."""
        now = utcnow()
        await db.execute(delete(DeviceGrant).where(DeviceGrant.expires_at < now))
        await db.execute(delete(SigninState).where(SigninState.expires_at < now))
        if source is not None:
            mine = await self._count_from(db, source)
            if mine >= MAX_PENDING_PER_SOURCE:
                dropped = await _drop_oldest(db, mine - MAX_PENDING_PER_SOURCE + 1,
                                             lambda column: func.coalesce(column, "") == source)
                log.info("sign-ins in progress from %s at its share (%d): dropped its %d oldest", source,
                         MAX_PENDING_PER_SOURCE, dropped)
        pending = (await db.scalar(select(func.count()).select_from(DeviceGrant)) or 0) + \
            (await db.scalar(select(func.count()).select_from(SigninState)) or 0)
        excess = pending - MAX_PENDING + 1
        dropped = 0
        while dropped < excess:
            # The addresses holding the most unfinished sign-ins (a redeemed device code is kept till it expires,
            # to recognise its reuse, and is not dropped early), then their oldest.
            unfinished = _unfinished().subquery()
            top = await db.scalar(select(func.count()).select_from(unfinished).group_by(unfinished.c.source)
                                  .order_by(func.count().desc()).limit(1))
            if not top:
                break
            heaviest = select(unfinished.c.source).group_by(unfinished.c.source).having(func.count() == top)
            step = await _drop_oldest(db, excess - dropped,
                                      lambda column, heaviest=heaviest: func.coalesce(column, "").in_(heaviest))
            if not step:
                break
            dropped += step
        if excess > 0:
            log.warning("sign-ins in progress at the limit (%d): dropped %d of the address holding the most",
                        MAX_PENDING, dropped)
        if dropped < excess:  # only redeemed device codes left to drop: nothing to make room with
            await db.commit()
            raise NotReady("too many sign-ins in progress; try again in a minute",
                           internal=f"{pending} sign-ins in progress (limit {MAX_PENDING})")

    @staticmethod
    async def _count_from(db: AsyncSession, source: str) -> int:
        unfinished = _unfinished().subquery()
        return int(await db.scalar(select(func.count()).select_from(unfinished)
                                   .where(unfinished.c.source == source)) or 0)

    async def poll_device(self, device_code: str) -> TokenPair:
        if not tokens.looks_like(device_code, DEVICE_CODE_PREFIX):
            raise InvalidGrant("unknown device code")
        now = utcnow()
        async with self.sessions() as db:
            grant = await db.scalar(select(DeviceGrant).where(DeviceGrant.prefix == tokens.lookup_prefix(device_code)))
            if grant is None or not tokens.matches(device_code, grant.token_hash):
                raise InvalidGrant("unknown device code")
            if grant.redeemed_at is not None:
                raise InvalidGrant("this device code was already used; run orz cloud login again")
            if grant.expires_at <= now:
                await db.delete(grant)
                await db.commit()
                raise ExpiredToken("the sign-in code expired before it was approved; run orz cloud login again")
            if grant.next_poll_at is not None and now < grant.next_poll_at:
                grant.interval_s += SLOW_DOWN_STEP_S
                grant.next_poll_at = now + timedelta(seconds=grant.interval_s)
                await db.commit()
                raise SlowDown("polling too fast; wait longer between polls", interval=grant.interval_s)
            grant.next_poll_at = now + timedelta(seconds=grant.interval_s)
            await db.commit()
            grant_id, provider_name = grant.id, grant.provider
            upstream_code = self.box.open(Sealed(grant.key_id, grant.nonce, grant.ciphertext),
                                          _binding(grant_id)).decode()
        provider = self.provider(provider_name)
        try:
            identity = await provider.poll_device(upstream_code)
        except SlowDown as exc:
            await self._slow_down(grant_id)
            raise SlowDown(exc.detail, interval=await self._interval(grant_id)) from None
        async with self.sessions() as db:
            # Single use: only the poll that flips redeemed_at gets the tokens.
            claimed = await db.execute(update(DeviceGrant).where(DeviceGrant.id == grant_id,
                                                                 DeviceGrant.redeemed_at.is_(None))
                                       .values(redeemed_at=utcnow()))
            await db.commit()
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                raise InvalidGrant("this device code was already used; run orz cloud login again")
        return await self.sign_in(identity)

    async def _slow_down(self, grant_id: str) -> None:
        async with self.sessions() as db:
            await db.execute(update(DeviceGrant).where(DeviceGrant.id == grant_id)
                             .values(interval_s=DeviceGrant.interval_s + SLOW_DOWN_STEP_S))
            await db.commit()

    async def _interval(self, grant_id: str) -> int:
        async with self.sessions() as db:
            return int(await db.scalar(select(DeviceGrant.interval_s).where(DeviceGrant.id == grant_id)) or 5)

    # -- tokens ------------------------------------------------------------------------------------

    async def sign_in(self, identity: Identity, *, refresh: bool = True, ttl_s: int | None = None) -> TokenPair:
        async with self.sessions() as db:
            user = await rules.user_for(db, self.settings, identity)
            pair = await self._issue(db, user, identity.source, family_id=new_id("fam") if refresh else None,
                                     ttl_s=ttl_s)
            return replace(pair, login=identity.login)

    async def _issue(self, db: AsyncSession, user: User, source: str, *, family_id: str | None,
                     ttl_s: int | None = None) -> TokenPair:
        now = utcnow()
        ttl = ttl_s or self.settings.signin_token_ttl_s
        access = tokens.issue(tokens.API_TOKEN_PREFIX)
        row = ApiToken(id=new_id("tok"), user_id=user.id, name=f"sign-in ({source})"[:64], prefix=access.prefix,
                       token_hash=access.digest, expires_at=now + timedelta(seconds=ttl), source=source)
        db.add(row)
        refresh_value = None
        if family_id is not None:
            refresh = tokens.issue(REFRESH_TOKEN_PREFIX)
            db.add(RefreshToken(user_id=user.id, family_id=family_id, api_token_id=row.id, prefix=refresh.prefix,
                                token_hash=refresh.digest, source=source,
                                expires_at=now + timedelta(seconds=self.settings.signin_refresh_ttl_s)))
            refresh_value = refresh.value
        await db.commit()
        return TokenPair(access_token=access.value, expires_in=ttl, refresh_token=refresh_value, source=source,
                         user=user)

    async def refresh(self, value: str) -> TokenPair:
        """A new API token and a new refresh token for a refresh token, which is spent. A spent one
        presented again means it was copied: its whole family and their API tokens are revoked."""
        invalid = InvalidGrant("the refresh token is invalid, expired or revoked; run orz cloud login again")
        if not tokens.looks_like(value, REFRESH_TOKEN_PREFIX):
            raise invalid
        now = utcnow()
        async with self.sessions() as db:
            row = await db.scalar(select(RefreshToken).where(RefreshToken.prefix == tokens.lookup_prefix(value)))
            if row is None or not tokens.matches(value, row.token_hash):
                raise invalid
            owner = await db.get(User, row.user_id)
            if owner is None or not owner.is_active:  # disabling revoked it too; say why it stopped
                raise SignInRefused("this account is disabled")
            if row.used_at is not None:
                await api_tokens.revoke_family(db, row.family_id)
                raise InvalidGrant("this refresh token was already used; every token of its sign-in is revoked")
            if row.revoked_at is not None or row.expires_at <= now:
                raise invalid
            claimed = await db.execute(update(RefreshToken).where(RefreshToken.id == row.id,
                                                                  RefreshToken.used_at.is_(None)).values(used_at=now))
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                await db.rollback()
                raise invalid
            return await self._issue(db, owner, row.source or "refresh", family_id=row.family_id)

    async def revoke(self, api_token: str) -> None:
        """Logout: the presented API token and every token of its sign-in (its refresh token family)."""
        async with self.sessions() as db:
            row = await db.scalar(select(ApiToken).where(ApiToken.prefix == tokens.lookup_prefix(api_token)))
            if row is None or not tokens.matches(api_token, row.token_hash):
                return
            await api_tokens.revoke_row(db, row)

    # -- the browser: authorization code + PKCE -------------------------------------------------------

    def allowed_redirect_uris(self) -> tuple[str, ...]:
        """Where a browser sign-in may return: the web door's callback (never a caller's choice)."""
        return (self.settings.signin_callback_url(),)

    def _browser_provider(self, name: str | None) -> OidcProvider | GitHubProvider:
        """Who signs a browser in: the one named, else the OIDC issuer, else GitHub (its web flow)."""
        if name is None:
            name = "oidc" if "oidc" in self.providers else "github" if "github" in self.providers else None
        if name is None:
            raise SignInNotConfigured("browser sign-in needs an identity provider (ORZ_OIDC_ISSUER or "
                                      "ORZ_GITHUB_CLIENT_ID with ORZ_GITHUB_CLIENT_SECRET)")
        found = self.provider(name)
        if isinstance(found, GitHubProvider) and not found.web_flow:
            raise SignInNotConfigured("browser sign-in with GitHub needs the OAuth app's client secret "
                                      "(ORZ_GITHUB_CLIENT_SECRET)")
        assert isinstance(found, OidcProvider | GitHubProvider)
        return found

    async def start_browser(self, redirect_uri: str, provider_name: str | None = None, *,
                            source: str | None = None, page_nonce: str | None = None) -> tuple[str, str]:
        """The provider's authorization URL and the state to bind to the browser (a cookie); ``source``: the
        browser's address (its share of the sign-ins in progress); ``page_nonce``: the door's page's, handed
        back by finish_browser."""
        provider = self._browser_provider(provider_name)
        if redirect_uri not in self.allowed_redirect_uris():
            raise BadRequest("redirect_uri is not this server's sign-in callback")
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        row_id = new_id("sst")
        # Which provider started it is sealed with the verifier: the callback redeems the code there only.
        secret = {"nonce": nonce, "verifier": verifier, "provider": provider.name, "page": page_nonce}
        sealed = self.box.seal(json.dumps(secret).encode(), _binding(row_id))
        key = _source_key(source)
        await self._make_room(key)
        async with self.sessions() as db:
            db.add(SigninState(id=row_id, state_hash=tokens.digest(state), redirect_uri=redirect_uri, source=key,
                               key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext,
                               expires_at=utcnow() + timedelta(seconds=BROWSER_STATE_TTL_S)))
            await db.commit()
        url = await provider.authorization_url(redirect_uri=redirect_uri, state=state, nonce=nonce,
                                               code_challenge=challenge)
        return url, state

    async def finish_browser(self, state: str, code: str, redirect_uri: str) -> TokenPair:
        """Spend the state (single use), redeem the code with its PKCE verifier at the provider that started
        the sign-in, check the nonce (OIDC)."""
        async with self.sessions() as db:
            row = await db.scalar(select(SigninState).where(SigninState.state_hash == tokens.digest(state)))
            if row is None:
                raise InvalidGrant("unknown or already used sign-in state")
            claimed = await db.execute(delete(SigninState).where(SigninState.id == row.id))
            await db.commit()
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                raise InvalidGrant("unknown or already used sign-in state")
        if row.expires_at <= utcnow():
            raise ExpiredToken("the sign-in took too long; start again")
        if row.redirect_uri != redirect_uri:
            raise InvalidGrant("the sign-in returned to another address than it started from")
        secret = json.loads(self.box.open(Sealed(row.key_id, row.nonce, row.ciphertext), _binding(row.id)))
        provider = self._browser_provider(secret.get("provider", "oidc"))  # sign-ins started before: OIDC
        identity = await provider.redeem_code(code=code, code_verifier=secret["verifier"],
                                              redirect_uri=redirect_uri, nonce=secret["nonce"])
        return replace(await self.sign_in(identity, refresh=False), page_nonce=secret.get("page"))

    async def exchange_github(self, github_token: str, github_id: int | None) -> TokenPair:
        """The Go CLI's login: a GitHub token (checked against GitHub's /user) for an API token. It has no
        refresh token, so the API token lives as long as a refresh token would."""
        identity = await self.github.identity_from_token(github_token)
        if github_id is not None and identity.subject != str(github_id):
            raise InvalidGrant("the GitHub token belongs to another account than github_id")
        # A token another app obtained (any site's "Sign in with GitHub", a leaked personal token) names its
        # owner as well as ours does: only one issued to this server's app signs its owner in here.
        if await self.github.issued_to_this_app(github_token) is False:
            raise InvalidGrant("the GitHub token was not issued to this server's GitHub app; log in again with "
                               "`orz login` against this server")
        return await self.sign_in(identity, refresh=False, ttl_s=self.settings.signin_refresh_ttl_s)


def _source_key(address: str | None) -> str | None:
    """What a sign-in in progress is counted under: its address as per-address limits count it (an IPv6 one as
    its /64)."""
    return limit_key(address)[:64] if address else None


def _unfinished() -> CompoundSelect:
    """The source of every sign-in in progress nobody finished, in both tables ('' for those recorded before
    the source was)."""
    return union_all(
        select(func.coalesce(DeviceGrant.source, "").label("source")).where(DeviceGrant.redeemed_at.is_(None)),
        select(func.coalesce(SigninState.source, "").label("source")))


async def _drop_oldest(db: AsyncSession, count: int,
                       where: Callable[[Any], ColumnElement[bool]]) -> int:
    """Delete the ``count`` oldest unfinished sign-ins (of both tables together) whose source ``where`` picks;
    how many went."""
    devices = (await db.execute(select(DeviceGrant.created_at, DeviceGrant.id)
                                .where(DeviceGrant.redeemed_at.is_(None), where(DeviceGrant.source))
                                .order_by(DeviceGrant.created_at, DeviceGrant.id).limit(count))).all()
    states = (await db.execute(select(SigninState.created_at, SigninState.id).where(where(SigninState.source))
                               .order_by(SigninState.created_at, SigninState.id).limit(count))).all()
    oldest = sorted([(at, "device", row_id) for at, row_id in devices]
                    + [(at, "state", row_id) for at, row_id in states])[:count]
    device_ids = [row_id for _, kind, row_id in oldest if kind == "device"]
    state_ids = [row_id for _, kind, row_id in oldest if kind == "state"]
    if device_ids:
        await db.execute(delete(DeviceGrant).where(DeviceGrant.id.in_(device_ids)))
    if state_ids:
        await db.execute(delete(SigninState).where(SigninState.id.in_(state_ids)))
    return len(oldest)


def half_configured(settings: Settings) -> list[str]:
    """Sign-in settings given without the ones that turn the provider on: the provider stays off, and
    without this the operator learns it only from a user's "no identity provider configured"."""
    problems = []
    oidc = {"ORZ_OIDC_ISSUER": settings.oidc_issuer, "ORZ_OIDC_CLIENT_ID": settings.oidc_client_id,
            "ORZ_OIDC_CLIENT_SECRET": settings.oidc_client_secret.get_secret_value()}
    if any(oidc.values()) and not (settings.oidc_issuer and settings.oidc_client_id):
        missing = [name for name, value in list(oidc.items())[:2] if not value]
        problems.append(f"OIDC sign-in is off: {' and '.join(missing)} not set (docs/sign-in.md)")
    if settings.github_client_secret.get_secret_value() and not settings.github_client_id:
        problems.append("GitHub sign-in is off: ORZ_GITHUB_CLIENT_SECRET is set but ORZ_GITHUB_CLIENT_ID is not "
                        "(docs/sign-in.md)")
    return problems
