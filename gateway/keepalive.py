"""Keepalive checks of the gateway's connections on one timer per process, not one per connection.

asyncssh arms a TimerHandle per connection for its keepalive (re-armed whenever data arrives: at most once
a second with the fast path). Each is ~0.5 KiB (the handle, its bound callback, libuv's timer), two per
attached session: about 3% of an idle session. Here a connection's keepalive is due at a whole second of
the loop's clock and listed under it; one timer a second runs asyncssh's own keepalive callback for the
connections due, which sends the request, counts the unanswered ones and closes a silent connection just
as it does with its own timer (at most a second later). `missing_state` names the asyncssh attributes this
relies on, for the test that guards pyproject's asyncssh pin; without them a connection keeps asyncssh's
own timer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

log = logging.getLogger(__name__)

# A loop may run a timer a little before its time (asyncio: within its clock's resolution; uvloop rounds to
# milliseconds): a second due this close counts as due, rather than arming the timer again for it.
_EARLY_S = 0.05

_CONN_STATE = ("_loop", "_keepalive_interval", "_keepalive_timer", "_keepalive_timer_callback",
               "_set_keepalive_timer", "_cancel_keepalive_timer")


def missing_state(conn: Any) -> list[str]:
    """The connection attributes this module relies on that the installed asyncssh lacks."""
    return [f"connection.{name}" for name in _CONN_STATE if not hasattr(conn, name)]


class _Wheel:
    """The connections whose keepalive is due, by the whole second of the loop's clock it is due at."""

    def __init__(self) -> None:
        self._due: dict[int, set[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0

    def add(self, conn: Any, delay: float) -> int:
        loop = conn._loop
        if loop is not self._loop or loop.is_closed():
            # A new loop (a test's): the connections of the old one went with it.
            self._due.clear()
            self._loop, self._timer = loop, None
        second = math.ceil(loop.time() + delay)
        self._due.setdefault(second, set()).add(conn)
        if self._timer is None or second < self._timer_at:  # (connections' intervals differ: 30 s, 60 s)
            self._arm(loop, second)
        return second

    def _arm(self, loop: asyncio.AbstractEventLoop, second: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(second, self._tick), second

    def discard(self, conn: Any, second: int) -> None:
        conns = self._due.get(second)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._due[second]

    def _tick(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + _EARLY_S
        for second in sorted(s for s in self._due if s <= now):
            for conn in self._due.pop(second):
                conn._keepalive_timer = None
                try:
                    conn._keepalive_timer_callback()  # asyncssh's: arms the next check (add) or closes
                except Exception:  # one connection's failure must not stop the others' checks
                    log.exception("keepalive check failed")
        if self._due:
            self._arm(loop, max(min(self._due), math.floor(now) + 1))


_wheel = _Wheel()
_usable_by_class: dict[type, bool] = {}


def _usable(conn: Any) -> bool:
    usable = _usable_by_class.get(type(conn))
    if usable is None:
        usable = _usable_by_class[type(conn)] = not missing_state(conn)
    return usable


class OnOneTimer:
    """Mixed into the gateway's connection classes (before asyncssh's): keepalive checks on the wheel."""

    def _set_keepalive_timer(self) -> None:
        conn: Any = self
        if not _usable(conn):
            super()._set_keepalive_timer()  # type: ignore[misc]
        elif conn._keepalive_interval:
            conn._keepalive_timer = _wheel.add(conn, conn._keepalive_interval)

    def _cancel_keepalive_timer(self) -> None:
        conn: Any = self
        timer = conn._keepalive_timer
        if type(timer) is int:
            _wheel.discard(conn, timer)
            conn._keepalive_timer = None
        else:
            super()._cancel_keepalive_timer()  # type: ignore[misc]
