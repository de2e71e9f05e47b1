"""The sender: claims due deliveries, signs and POSTs them, records each attempt, retries with backoff.

Each scheduler replica runs one Deliverer loop (not only the lease holder: claims, not the lease, keep
replicas apart, and a slow receiver never holds up the reaper). A replica claims due rows with one
conditional UPDATE (on PostgreSQL over a ``FOR UPDATE SKIP LOCKED`` subquery, so concurrent claimers
take disjoint rows without waiting; SQLite has one writer), sends them, and records the outcome only if
its claim still stands. A replica that dies mid-send leaves a claim that expires after ``claim_s``;
another replica then sends the row again, so receivers dedupe on ``X-Orz-Delivery`` (docs/webhooks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import metrics, schemas
from api.credentials.secrets_box import RowBinding, Sealed, SecretsBox
from api.db.base import utcnow
from api.db.dialect import is_postgres
from api.db.models import User, Webhook, WebhookDelivery
from api.errors import SecretsKeyError
from api.instances import repo_policy
from api.jobs.lease import default_holder_id
from api.settings import Settings
from api.webhooks import policy

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Orz-Signature"
TIMESTAMP_HEADER = "X-Orz-Timestamp"
DELIVERY_HEADER = "X-Orz-Delivery"
EVENT_HEADER = "X-Orz-Event"
WEBHOOK_HEADER = "X-Orz-Webhook"
USER_AGENT = "orzbob-cloud-webhooks/1"
CLAIM_BATCH = 20
# Finished deliveries stay in the log this long (the hourly purge removes older ones).
KEEP_FINISHED = timedelta(days=14)
_ERROR_CHARS = 300
_REASON_CHARS = 100

Clock = Callable[[], datetime]


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=`` + hex HMAC-SHA256 of ``"<timestamp>." + body`` under the webhook's secret."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def binding(org_id: str, webhook_id: str) -> RowBinding:
    """A webhook's sealed secret is bound to its row: copied onto another webhook it does not open."""
    return RowBinding(org_id=org_id, scope="webhook", name=webhook_id)


@dataclass
class Claimed:
    id: str
    webhook_id: str
    org_id: str
    url: str
    event: str
    body: str
    attempts: int
    log: list[dict[str, Any]]
    sealed: Sealed
    owner_active: bool = True


@dataclass
class Outcome:
    status: int | None = None
    error: str | None = None
    retry: bool = False
    retry_after_s: float | None = None
    duration_ms: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Deliverer:
    """Sends due deliveries from the database; ``start`` runs the polling loop on the current event loop."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], box: SecretsBox, *,
                 holder: str | None = None, resolve: repo_policy.Resolver = repo_policy.system_resolver,
                 clock: Clock = utcnow, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``transport``: httpx's, for tests of TLS; by default real connections."""
        self.settings = settings
        self.sessions = sessions
        self.box = box
        self.holder = holder or default_holder_id()
        self.resolve = resolve
        self.now = clock
        # Long enough for one attempt (connect + answer) with room to record it.
        self.claim_s = settings.webhook_timeout_s * 3 + 30
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_prune = 0.0

    # ------------------------------------------------------------------------------------ the loop

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="webhook-deliveries")

    def wake(self) -> None:
        """Look for due deliveries now rather than at the next poll."""
        self._wake.set()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Let attempts in flight finish (up to ``grace_s``), then close the HTTP client."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # On time-out wait_for cancels it: its claims expire and another replica sends those rows.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task, grace_s)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _loop(self) -> None:
        while not self._stopping:
            sent = 0
            try:
                sent = await self.run_once()
            except Exception:
                # The database is away or a bug: logged, and tried again at the next poll.
                log.exception("webhook deliveries: pass failed")
            if sent or self._stopping:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.webhook_poll_s)
            self._wake.clear()

    async def run_once(self, limit: int = CLAIM_BATCH) -> int:
        """Claim what is due and make one attempt at each (concurrently); the number claimed."""
        if time.monotonic() - self._last_prune > 3600:
            self._last_prune = time.monotonic()
            await self.prune()
        claimed = await self.claim(limit)
        if claimed:
            await asyncio.gather(*(self.attempt(c) for c in claimed))
        return len(claimed)

    async def deliver_now(self, delivery_id: str) -> bool:
        """One attempt at this delivery now, if it is due and unclaimed (the test ping); False otherwise."""
        claimed = await self.claim(1, only=delivery_id)
        for c in claimed:
            await self.attempt(c)
        return bool(claimed)

    # ------------------------------------------------------------------------------------ claim and record

    async def claim(self, limit: int, only: str | None = None) -> list[Claimed]:
        now = self.now()
        wd = WebhookDelivery
        async with self.sessions() as db:
            due = (select(wd.id)
                   .where(wd.state == "pending", wd.next_attempt_at <= now,
                          or_(wd.claimed_until.is_(None), wd.claimed_until < now))
                   .order_by(wd.next_attempt_at).limit(limit))
            if only is not None:
                due = due.where(wd.id == only)
            if is_postgres(db):
                # Rows another replica is claiming right now are skipped, not waited for.
                due = due.with_for_update(skip_locked=True)
            ids = list(await db.scalars(
                update(wd).where(wd.id.in_(due.scalar_subquery()))
                .values(claimed_by=self.holder, claimed_until=now + timedelta(seconds=self.claim_s))
                .returning(wd.id), execution_options={"synchronize_session": False}))
            if not ids:
                await db.commit()
                return []
            rows = (await db.execute(
                select(wd.id, wd.webhook_id, Webhook.org_id, Webhook.url, wd.event, wd.body, wd.attempts, wd.log,
                       Webhook.key_id, Webhook.nonce, Webhook.ciphertext, User.is_active)
                .join(Webhook, Webhook.id == wd.webhook_id).join(User, User.id == Webhook.user_id)
                .where(wd.id.in_(ids)))).all()
            await db.commit()
        return [Claimed(r.id, r.webhook_id, r.org_id, r.url, r.event, r.body, r.attempts, list(r.log or []),
                        Sealed(r.key_id, r.nonce, r.ciphertext), bool(r.is_active)) for r in rows]

    async def attempt(self, c: Claimed) -> str:
        """Send once and record it; the delivery's state afterwards (pending, delivered or failed)."""
        outcome = await self.send(c)
        n = c.attempts + 1
        now = self.now()
        entry = {"at": schemas.wire_time(now), "attempt": n, "status_code": outcome.status, "error": outcome.error,
                 "duration_ms": outcome.duration_ms}
        values: dict[str, Any] = {"attempts": n, "last_status": outcome.status, "last_error": outcome.error,
                                  "log": [*c.log, entry], "claimed_by": None, "claimed_until": None}
        if outcome.delivered:
            values.update(state="delivered", finished_at=now)
        elif outcome.retry and n < self.settings.webhook_max_attempts:
            values.update(next_attempt_at=now + timedelta(seconds=self.backoff(n, outcome.retry_after_s)))
        else:
            gave_up = f"gave up after {n} attempt{'s' if n > 1 else ''}" if outcome.retry else None
            values.update(state="failed", finished_at=now,
                          last_error="; ".join(p for p in (outcome.error, gave_up) if p) or None)
        async with self.sessions() as db:
            result = await db.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == c.id, WebhookDelivery.claimed_by == self.holder)
                .values(**values), execution_options={"synchronize_session": False})
            await db.commit()
        if not result.rowcount:  # type: ignore[attr-defined]
            log.warning("webhook %s delivery %s: claim lost before recording attempt %d", c.webhook_id, c.id, n)
        state = str(values.get("state", "pending"))
        metrics.WEBHOOK_ATTEMPTS.labels(result="retry" if state == "pending" else state).inc()
        log.info("webhook %s delivery %s (%s): attempt %d -> %s%s", c.webhook_id, c.id, c.event, n,
                 outcome.status if outcome.status is not None else "no answer",
                 f" ({outcome.error})" if outcome.error else "",
                 extra={"event": "webhook_delivery", "webhook_id": c.webhook_id, "delivery_state": state})
        return state

    def backoff(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, capped, with half of it random (jitter)."""
        cap = self.settings.webhook_retry_max_s
        delay = min(cap, self.settings.webhook_retry_base_s * 2 ** (attempt - 1))
        jittered = delay / 2 + random.uniform(0, delay / 2)  # nosec B311  # jitter, not a secret
        if retry_after_s is not None:
            jittered = max(jittered, min(cap, retry_after_s))
        return jittered

    async def prune(self) -> int:
        """Forget finished deliveries older than KEEP_FINISHED."""
        async with self.sessions() as db:
            result = await db.execute(delete(WebhookDelivery).where(
                WebhookDelivery.state != "pending", WebhookDelivery.finished_at < self.now() - KEEP_FINISHED))
            await db.commit()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------------ send

    @staticmethod
    def _unreached(c: Claimed, target: policy.Target, detail: str) -> str:
        """What the owner's log says of a connection that failed: httpx's words to a public receiver (its owner
        debugs it with them); one sentence to an address only ORZ_WEBHOOK_ALLOW_HOSTS let through, where
        refused, timed out and TLS failed told which ports of the operator's network answer. The server's
        log keeps the detail."""
        if repo_policy.all_public(target.addresses):
            return detail
        log.info("webhook %s delivery %s: %s port %d not reached: %s", c.webhook_id, c.id, target.host, target.port,
                 detail, extra={"event": "webhook_unreached"})
        return UNREACHED

    @staticmethod
    def _not_reached(c: Claimed, target: policy.Target, detail: str, started: float) -> Outcome:
        """A failed connection's outcome. Where the owner reads the one sentence, no duration either: about
        1 ms (refused), a TLS handshake's time, or the time-out told those apart all the same."""
        error = Deliverer._unreached(c, target, detail)
        return Outcome(error=error, retry=True, duration_ms=None if error == UNREACHED else _ms(started))

    async def send(self, c: Claimed) -> Outcome:
        """One signed POST to the address the rule checked just now (DNS rebinding finds no new target)."""
        if not c.owner_active:
            # Queued before the owner was disabled: sent now it would still tell them about the sessions.
            return Outcome(error="not sent: the webhook's owner is disabled")
        try:
            target = await policy.check(c.url, self.settings, self.resolve)
        except policy.WebhookUrlRefused as exc:
            # Retried whatever the reason (an unresolvable name may resolve later): a private address that
            # failed at once while an unknown name was retried told the owner which names the server's DNS
            # knows. Nothing is connected to; the next attempt checks again.
            return Outcome(error=exc.detail, retry=True)
        try:
            secret = self.box.open(c.sealed, binding(c.org_id, c.webhook_id)).decode()
        except SecretsKeyError as exc:
            log.error("webhook %s: %s", c.webhook_id, exc.detail)
            return Outcome(error="the webhook's signing secret cannot be read (server key configuration)", retry=True)
        body = c.body.encode()
        timestamp = int(time.time())
        parts = urlsplit(c.url)
        address = target.addresses[0]
        netloc = f"[{address}]:{target.port}" if ":" in address else f"{address}:{target.port}"
        headers = {
            # One connection per attempt, never kept: the pool knows a connection by the address it went to, so
            # a kept one, opened and verified for one webhook's name (another tenant's, on an address that routes
            # TLS by name), carried the next delivery to that address there, its own name never checked.
            "Connection": "close",
            "Host": parts.netloc, "Content-Type": "application/json", "User-Agent": USER_AGENT,
            TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: signature(secret, timestamp, body),
            DELIVERY_HEADER: c.id, EVENT_HEADER: c.event, WEBHOOK_HEADER: c.webhook_id,
        }
        # TLS still names (SNI) and verifies the URL's host while the socket goes to the checked address.
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        started = time.perf_counter()
        limit_s = self.settings.webhook_timeout_s
        try:
            if self._client is None:
                # No proxy from the environment: the connection must go to the address just checked.
                self._client = httpx.AsyncClient(timeout=limit_s, follow_redirects=False,
                                                 transport=self._transport, trust_env=False)
            # The receiver is whoever the webhook's owner named: its answer's body is never read (an endless
            # one went into this process's memory), and the whole attempt, not each read, has the time-out
            # (a receiver dripping header bytes held it, and the batch it was in, for ever).
            async with asyncio.timeout(limit_s), self._client.stream(
                    "POST", urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
                    content=body, headers=headers, extensions=extensions) as response:
                status = response.status_code
                reason = response.reason_phrase[:_REASON_CHARS]
                retry_after = _retry_after(response.headers.get("retry-after"))
        except httpx.TransportError as exc:
            return self._not_reached(c, target, _describe(exc), started)
        except TimeoutError:
            return self._not_reached(c, target, f"TimeoutError: no answer within {limit_s:g} s", started)
        outcome = Outcome(status=status, duration_ms=_ms(started))
        if 200 <= status < 300:
            return outcome
        outcome.retry = status == 429 or status >= 500
        outcome.error = f"the receiver answered {status} {reason}".rstrip()
        if 300 <= status < 400:
            outcome.error += " (redirects are not followed: register the final URL)"
        outcome.retry_after_s = retry_after
        return outcome


UNREACHED = "the receiver could not be reached (no connection, no TLS, or no answer in time)"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _describe(exc: httpx.TransportError) -> str:
    # httpx's messages name the connection's problem, not the URL (whose path may be a secret, as Slack's is).
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:_ERROR_CHARS] if text else type(exc).__name__


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, (parsedate_to_datetime(value) - utcnow()).total_seconds())
    except (TypeError, ValueError):
        return None
