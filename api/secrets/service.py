"""Secret records: create, list, read (never values), replace, delete, and resolve for injection."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import schemas
from api.auth import Principal
from api.credentials.secrets_box import RowBinding, Sealed, SecretsBox
from api.db.base import utcnow
from api.db.models import Secret
from api.errors import Conflict, Forbidden, NotFound, ValidationFailed

log = logging.getLogger(__name__)

ORG_SCOPE = "org"
ScopeName = Literal["user", "org"]
# All values of one secret together; the request size limit alone would allow far more.
MAX_SECRET_BYTES = 64 * 1024
MAX_SECRETS_PER_ORG = 500
# The runner reads its own configuration from ORZ_* variables; a secret must not override them.
RESERVED_KEY_PREFIX = "ORZ_"


def scope_name(row: Secret) -> ScopeName:
    return "org" if row.scope == ORG_SCOPE else "user"


def binding(row: Secret) -> RowBinding:
    return RowBinding(org_id=row.org_id, scope=row.scope, name=row.name)


def secret_view(row: Secret) -> schemas.Secret:
    """The public shape: names, keys and times, never values."""
    return schemas.Secret(name=row.name, keys=list(row.keys), scope=scope_name(row),
                          created_at=row.created_at, updated_at=row.updated_at)


def check_data(data: Mapping[str, str]) -> None:
    """Rules beyond the schema's; messages name keys and sizes, never values."""
    errors = []
    for key in data:
        if key.upper().startswith(RESERVED_KEY_PREFIX):
            errors.append({"field": f"data.{key}", "message": f"keys starting with {RESERVED_KEY_PREFIX} are reserved"})
    total = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    if total > MAX_SECRET_BYTES:
        errors.append({"field": "data",
                       "message": f"keys and values total {total} bytes; the limit is {MAX_SECRET_BYTES}"})
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValidationFailed(f"{first['field']}: {first['message']}{more}", errors=errors)


class SecretService:
    """The only place that reads or writes secret rows; implements InstanceService's SecretEnvSource."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], box: SecretsBox) -> None:
        self.sessions = sessions
        self.box = box

    async def create(self, who: Principal, req: schemas.SecretCreate) -> Secret:
        check_data(req.data)
        if req.scope == "org":
            self._require_admin(who)
        scope = ORG_SCOPE if req.scope == "org" else who.user_id
        sealed = self.box.seal_values(req.data, RowBinding(who.org_id, scope, req.name))
        now = utcnow()
        row = Secret(
            org_id=who.org_id, user_id=None if scope == ORG_SCOPE else who.user_id, scope=scope, name=req.name,
            keys=sorted(req.data), key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext,
            created_at=now, updated_at=now,
        )
        async with self.sessions() as db:
            count = await db.scalar(select(func.count()).select_from(Secret).where(Secret.org_id == who.org_id))
            if int(count or 0) >= MAX_SECRETS_PER_ORG:
                raise Conflict(f"your org has {MAX_SECRETS_PER_ORG} secrets, the most it may hold; delete one first")
            db.add(row)
            try:
                await db.commit()
            except IntegrityError:
                await db.rollback()
                raise Conflict(f"a {req.scope} secret named {req.name} already exists; use PUT to replace it",
                               name=req.name, scope=req.scope) from None
        log.info("secret %s created (scope %s, %d keys) by %s", req.name, req.scope, len(req.data), who.actor)
        return row

    async def list(self, who: Principal) -> list[Secret]:
        async with self.sessions() as db:
            rows = await db.scalars(
                select(Secret)
                .where(Secret.org_id == who.org_id, Secret.scope.in_([who.user_id, ORG_SCOPE]))
                .order_by(Secret.name, Secret.scope)
            )
            return list(rows)

    async def get(self, who: Principal, name: str, scope: ScopeName | None = None) -> Secret:
        async with self.sessions() as db:
            return await self._find(db, who, name, scope)

    async def replace(self, who: Principal, name: str, req: schemas.SecretReplace,
                      scope: ScopeName | None = None) -> Secret:
        check_data(req.data)
        async with self.sessions() as db:
            row = await self._find(db, who, name, scope)
            if row.scope == ORG_SCOPE:
                self._require_admin(who)
            sealed = self.box.seal_values(req.data, binding(row))
            await db.execute(
                update(Secret).where(Secret.id == row.id).values(
                    keys=sorted(req.data), key_id=sealed.key_id, nonce=sealed.nonce,
                    ciphertext=sealed.ciphertext, updated_at=utcnow(),
                )
            )
            await db.commit()
            fresh = await db.get(Secret, row.id, populate_existing=True)
            assert fresh is not None
        log.info("secret %s replaced (scope %s, %d keys) by %s", name, scope_name(fresh), len(req.data), who.actor)
        return fresh

    async def delete(self, who: Principal, name: str, scope: ScopeName | None = None) -> None:
        async with self.sessions() as db:
            row = await self._find(db, who, name, scope)
            if row.scope == ORG_SCOPE:
                self._require_admin(who)
            await db.delete(row)
            await db.commit()
        log.info("secret %s deleted (scope %s) by %s", name, scope_name(row), who.actor)

    async def env_for(self, db: AsyncSession, org_id: str, user_id: str, names: Sequence[str]) -> dict[str, str]:
        """The environment the named secrets give a session of this user; fails naming what is missing."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        rows = await db.scalars(
            select(Secret).where(Secret.org_id == org_id, Secret.name.in_(wanted),
                                 Secret.scope.in_([user_id, ORG_SCOPE]))
        )
        chosen: dict[str, Secret] = {}
        for row in rows:
            # The user's own secret shadows an org-wide one of the same name.
            if row.name not in chosen or row.scope != ORG_SCOPE:
                chosen[row.name] = row
        missing = [n for n in wanted if n not in chosen]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise ValidationFailed.of("secrets", f"unknown secret{plural}: {', '.join(missing)}",
                                      missing_secrets=missing)
        env: dict[str, str] = {}
        origin: dict[str, str] = {}
        for name in wanted:
            row = chosen[name]
            values = self.box.open_values(Sealed(row.key_id, row.nonce, row.ciphertext), binding(row))
            for key, value in values.items():
                if key in env:
                    raise ValidationFailed.of("secrets", f"secrets {origin[key]} and {name} both set {key}; "
                                              "pick one of them", key=key, secrets=[origin[key], name])
                env[key] = value
                origin[key] = name
        return env

    async def _find(self, db: AsyncSession, who: Principal, name: str, scope: ScopeName | None) -> Secret:
        if not schemas.SECRET_NAME_RE.match(name):
            raise NotFound(f"no such secret: {name[:64]}")
        scopes = [who.user_id, ORG_SCOPE] if scope is None else [ORG_SCOPE if scope == "org" else who.user_id]
        rows = list(await db.scalars(
            select(Secret).where(Secret.org_id == who.org_id, Secret.name == name, Secret.scope.in_(scopes))
        ))
        if not rows:
            raise NotFound(f"no such secret: {name}")
        # The user's own secret shadows an org-wide one of the same name.
        rows.sort(key=lambda r: r.scope == ORG_SCOPE)
        return rows[0]

    @staticmethod
    def _require_admin(who: Principal) -> None:
        if not who.is_admin:
            raise Forbidden("only org admins may create, replace or delete org-wide secrets")
