"""Webhook records: create (the secret shown once), list, get, delete, the delivery log, the test ping."""

from __future__ import annotations

import logging
import secrets

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import failed_auth, schemas
from api.auth import Principal
from api.credentials.secrets_box import SecretsBox
from api.db.base import utcnow
from api.db.models import Webhook, WebhookDelivery, new_id
from api.errors import Conflict, NotFound, TooManyAttempts
from api.instances import repo_policy
from api.settings import Settings
from api.webhooks import outbox, policy
from api.webhooks.delivery import Deliverer, binding

log = logging.getLogger(__name__)

MAX_WEBHOOKS_PER_USER = 20
SECRET_PREFIX = "whsec_"  # noqa: S105  # nosec B105  # a public marker, not a secret
DELIVERY_LOG_LIMIT = 200
TEST_SOURCE_PREFIX = "webhook-test:"  # its key in auth_failures (api/failed_auth.py)


def webhook_view(row: Webhook) -> schemas.Webhook:
    """The public shape: never the secret."""
    return schemas.Webhook(id=row.id, url=row.url, format=row.format, events=list(row.events or ()),  # type: ignore[arg-type]
                           description=row.description, created_at=row.created_at)


def delivery_view(row: WebhookDelivery) -> schemas.WebhookDelivery:
    return schemas.WebhookDelivery(
        id=row.id, webhook_id=row.webhook_id, event=row.event, session_id=row.instance_id,
        state=row.state, attempts=row.attempts, status_code=row.last_status, error=row.last_error,  # type: ignore[arg-type]
        created_at=row.created_at, next_attempt_at=row.next_attempt_at if row.state == "pending" else None,
        finished_at=row.finished_at, log=[schemas.WebhookAttempt.model_validate(e) for e in row.log or ()])


class WebhookService:
    """The only place that reads or writes webhook rows for users (the Deliverer sends them)."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], box: SecretsBox,
                 deliverer: Deliverer, resolve: repo_policy.Resolver = repo_policy.system_resolver) -> None:
        self.settings = settings
        self.sessions = sessions
        self.box = box
        self.deliverer = deliverer
        self.resolve = resolve

    async def create(self, who: Principal, req: schemas.WebhookCreate) -> schemas.WebhookCreated:
        await policy.check(req.url, self.settings, self.resolve)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        hook_id = new_id("wh")
        sealed = self.box.seal(secret.encode(), binding(who.org_id, hook_id))
        row = Webhook(id=hook_id, org_id=who.org_id, user_id=who.user_id, url=req.url, format=req.format,
                      events=sorted(set(req.events), key=schemas.WEBHOOK_EVENTS.index), description=req.description,
                      key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext, created_at=utcnow())
        async with self.sessions() as db:
            count = await db.scalar(select(func.count()).select_from(Webhook).where(Webhook.user_id == who.user_id))
            if (count or 0) >= MAX_WEBHOOKS_PER_USER:
                raise Conflict(f"you have {count} webhooks, the most one user may have; delete one first")
            db.add(row)
            await db.commit()
        log.info("webhook %s created (%s, %s)", hook_id, row.format, ",".join(row.events),
                 extra={"event": "webhook_created"})
        return schemas.WebhookCreated(**webhook_view(row).model_dump(), secret=secret)

    async def list(self, who: Principal) -> list[Webhook]:
        async with self.sessions() as db:
            rows = await db.scalars(select(Webhook).where(Webhook.user_id == who.user_id)
                                    .order_by(Webhook.created_at, Webhook.id))
            return list(rows)

    async def get(self, who: Principal, hook_id: str) -> Webhook:
        async with self.sessions() as db:
            return await self._owned(db, who, hook_id)

    async def delete(self, who: Principal, hook_id: str) -> None:
        """Delete the webhook and its deliveries (pending ones are not sent)."""
        async with self.sessions() as db:
            row = await self._owned(db, who, hook_id)
            await db.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == row.id))
            await db.delete(row)
            await db.commit()
        log.info("webhook %s deleted", hook_id, extra={"event": "webhook_deleted"})

    async def deliveries(self, who: Principal, hook_id: str, limit: int = 50) -> list[WebhookDelivery]:
        """The newest deliveries first."""
        async with self.sessions() as db:
            await self._owned(db, who, hook_id)
            rows = await db.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook_id)
                                    .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
                                    .limit(min(max(limit, 1), DELIVERY_LOG_LIMIT)))
            return list(rows)

    async def test(self, who: Principal, hook_id: str) -> WebhookDelivery:
        """Queue a ping and make its first attempt now; retries (if it needs them) follow as for any event."""
        async with self.sessions() as db:
            await self._owned(db, who, hook_id)
        await self._count_test(who)  # after the ownership check: a stranger's id stays a 404
        async with self.sessions() as db:
            hook = await self._owned(db, who, hook_id)
            row = outbox.test_delivery(hook, utcnow())
            db.add(row)
            await db.commit()
            delivery_id = row.id
        await self.deliverer.deliver_now(delivery_id)
        async with self.sessions() as db:
            found = await db.get(WebhookDelivery, delivery_id)
            assert found is not None
            return found

    async def _count_test(self, who: Principal) -> None:
        """Each test is an outbound POST made at once, on the user's word: a few per window per user, all their
        webhooks together, counted in the database like sign-in attempts (every API replica shares the count,
        and deleting a webhook does not reset it)."""
        reply = await failed_auth.record(self.sessions, f"{TEST_SOURCE_PREFIX}{who.user_id}"[:64], self.settings,
                                         limit=self.settings.webhook_test_limit)
        if reply.failures > reply.limit:
            raise TooManyAttempts(f"too many test deliveries ({reply.limit} per {self.settings.auth_fail_window_s} s); "
                                  f"try again in {reply.retry_after_s} s", retry_after_s=reply.retry_after_s)

    @staticmethod
    async def _owned(db: AsyncSession, who: Principal, hook_id: str) -> Webhook:
        row = await db.get(Webhook, hook_id) if len(hook_id) <= 32 else None
        # Someone else's webhook reads as missing: ids are not confirmed to strangers.
        if row is None or row.user_id != who.user_id:
            raise NotFound(f"no webhook {hook_id[:40]}")
        return row
