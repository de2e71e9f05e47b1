"""Live attachments end when the API withdraws access (user disabled, session deleted, access revoked).

Why a poll, and this one: gateways hold no database and the API runs as N stateless replicas, so
nothing can push "user X is disabled" to every gateway. Each gateway instead asks the API every
`gateway_access_check_s` (1 s) about the distinct (session, user) pairs it has live, in one request
(chunks of ACCESS_CHECK_MAX pairs), and the API answers from two queries. API load is one small
request per gateway per interval, however many connections each holds; every replica runs its own
watch, so all of them cut a revoked user within about one interval plus a request (the target is 5 s).
Polling a list of revocations instead would need revocation timestamps in the database; re-authorizing
each connection would cost O(connections).

An unreachable API leaves live attachments alone (an API outage must not drop every user) and is logged
once per outage. New channels need the API's yes (Attachment.for_new_channel); while it cannot answer, a
connection's last yes stands for `gateway_reauth_grace_s` (ClientHandler._reauthorize). A revocation
this watch hears still ends the connection, grace or not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from api.client import ApiClient, ApiError
from api.schemas import ACCESS_CHECK_MAX, AccessCheck, LiveAttachment

log = logging.getLogger(__name__)


class Revocable(Protocol):
    """Something a user holds open on this gateway that a revocation must end."""

    def live(self) -> tuple[str, str] | None:
        """(session id, user id) while attached and allowed; None otherwise."""

    def revoke(self, reason: str) -> None:
        """End it, showing the user `reason` as one line."""


class AccessWatch:
    """Asks the API which live attachments must end, and ends them."""

    def __init__(self, api: ApiClient, interval_s: float) -> None:
        self.api = api
        self.interval_s = interval_s
        self._failing = False

    async def run(self, holders: Callable[[], Iterable[Revocable]]) -> None:
        """Forever, one check per interval (cancel to stop); `holders` lists what is open right now."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check(holders())
            except Exception:  # a bug here must not end the watch for good
                log.exception("access check round failed")

    async def check(self, holders: Iterable[Revocable]) -> int:
        """One round: returns how many holders were revoked."""
        live: dict[tuple[str, str], list[Revocable]] = {}
        for holder in holders:
            key = holder.live()
            if key is not None:
                live.setdefault(key, []).append(holder)
        pairs = list(live)
        ended = 0
        for start in range(0, len(pairs), ACCESS_CHECK_MAX):
            chunk = [LiveAttachment(session_id=s, user_id=u) for s, u in pairs[start:start + ACCESS_CHECK_MAX]]
            try:
                reply = await asyncio.wait_for(self.api.check_access(AccessCheck(attachments=chunk)),
                                               timeout=max(5.0, 5 * self.interval_s))
            except (ApiError, TimeoutError) as exc:
                if not self._failing:
                    log.warning("access check failed; live attachments stay until it works again: %s",
                                getattr(exc, "detail", None) or type(exc).__name__)
                self._failing = True
                return ended
            for revoked in reply.revoked:
                for holder in live.get((revoked.session_id, revoked.user_id), []):
                    log.info("access of %s to %s withdrawn: %s", revoked.user_id, revoked.session_id,
                             revoked.reason, extra={"event": "revoked", "session_id": revoked.session_id,
                                                    "user_id": revoked.user_id})
                    holder.revoke(revoked.reason)
                    ended += 1
        if self._failing:
            log.info("access check works again")
            self._failing = False
        return ended
