"""Limit connections that have not authenticated yet, per source address and in all.

Before authentication a connection costs the gateway a key exchange and a login timer, and asks
nothing of the client that would slow a flood. Like OpenSSH's MaxStartups / PerSourceMaxStartups, a
connection beyond either limit is refused the moment it is accepted, with one line that says why (sent
before the SSH version line, which RFC 4253 4.2 allows); connections of other sources keep being served.
A connection stops counting once it has authenticated or gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from api.addresses import limit_key
from gateway import metrics
from gateway.cork import CorkProtocol

log = logging.getLogger(__name__)

Verdict = Literal["ok", "source", "total"]
REFUSAL = {
    "source": b"orz: too many unauthenticated connections from your address; try again shortly\r\n",
    "total": b"orz: Orzbob Cloud is busy right now; try again shortly\r\n",
}


class PreauthLimiter:
    """Counts unauthenticated connections by source address (an IPv6 one by its /64: api/addresses.py)."""

    def __init__(self, per_source: int, total: int) -> None:
        self.per_source = per_source
        self.total = total
        self._by_source: Counter[str] = Counter()
        self._count = 0

    def admit(self, source: str) -> Verdict:
        source = limit_key(source)
        if self._by_source[source] >= self.per_source:
            return "source"
        if self._count >= self.total:
            return "total"
        self._by_source[source] += 1
        self._count += 1
        return "ok"

    def release(self, source: str) -> None:
        source = limit_key(source)
        self._count -= 1
        self._by_source[source] -= 1
        if self._by_source[source] <= 0:
            del self._by_source[source]

    def pending(self, source: str | None = None) -> int:
        return self._count if source is None else self._by_source[limit_key(source)]


class AttachSlots:
    """Attached connections per user on this replica: one user's certificate (good for minutes) or stream of
    attach tokens opened as many as they liked, each a runner connection and file descriptors of the
    gateway every other user shares. ``limit`` 0: no limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_user: Counter[str] = Counter()

    def refusal(self) -> str:
        return (f"you have {self.limit} connections open through this gateway, the most one user may; "
                "close some (a ControlMaster shares one) and try again")

    def take(self, user_id: str) -> bool:
        if self.limit and self._by_user[user_id] >= self.limit:
            return False
        self._by_user[user_id] += 1
        return True

    def give(self, user_id: str) -> None:
        self._by_user[user_id] -= 1
        if self._by_user[user_id] <= 0:
            del self._by_user[user_id]

    def held(self, user_id: str) -> int:
        return self._by_user[user_id]


class AdmittedProtocol(CorkProtocol):
    """A CorkProtocol that first asks the limiter; `inner.preauth_done()` ends the count at auth."""

    __slots__ = ("_limiter", "_refused", "_source", "_source_of")

    def __init__(self, inner: Any, limiter: PreauthLimiter, source_of: Callable[[Any], str]) -> None:
        super().__init__(inner)
        self._limiter = limiter
        self._source_of = source_of
        self._source: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        source = self._source_of(transport.get_extra_info("peername"))
        verdict = self._limiter.admit(source)
        if verdict != "ok":
            self._refused = True
            metrics.preauth_refused(verdict)
            log.info("connection from %s refused: too many unauthenticated connections (%s limit)", source, verdict)
            with contextlib.suppress(OSError):
                transport.write(REFUSAL[verdict])  # type: ignore[attr-defined]
            transport.close()
            return
        self._source = source
        self.inner.preauth_done = self.release
        super().connection_made(transport)

    def release(self) -> None:
        """Authenticated (or gone): this connection no longer counts."""
        if self._source is not None:
            self._limiter.release(self._source)
            self._source = None

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._refused else super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        if not self._refused:
            super().connection_lost(exc)
