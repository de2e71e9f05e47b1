"""How many events a session's runner may add to the shared database: a token bucket per session.

Program exits and agent-state changes arrive in heartbeats, and each one was an ``events`` row (an agent
change also a webhook delivery per hook). A runner is the session's own code: unchecked, one session
wrote 5,000 rows (6 MB) in 9 s, without end, into the database every tenant shares. The buckets live
in each API replica, so the bound is per replica: a session adds at most ``per_minute`` events a minute
through each (plus one note per dry spell saying some were left out).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class EventBudget:
    """``take(session_id)``: may this session's runner record one more event now?

    Each bucket also remembers whether it refused one since it last said yes (``refused_first``), so the
    caller notes a dry spell once, not per refusal."""

    def __init__(self, per_minute: int, max_sessions: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.max_sessions = max_sessions
        self.clock = clock
        # session id -> (tokens left, when counted, refused since the last yes); least recently used first,
        # so memory stays bounded.
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()
        self.refused_first = False

    def take(self, session_id: str) -> bool:
        """Spend one event of the session's allowance; False when it is used up (nothing spent), and then
        ``refused_first`` says whether this is the first refusal since the last event allowed."""
        self.refused_first = False
        if self.per_minute <= 0:
            return True  # 0 turns the limit off
        now = self.clock()
        tokens, then, dry = self._buckets.pop(session_id, (float(self.per_minute), now, False))
        tokens = min(float(self.per_minute), tokens + (now - then) * self.per_minute / 60.0)
        allowed = tokens >= 1.0
        self.refused_first = not allowed and not dry
        self._buckets[session_id] = (tokens - 1.0 if allowed else tokens, now, not allowed)
        while len(self._buckets) > self.max_sessions:
            self._buckets.popitem(last=False)
        return allowed
