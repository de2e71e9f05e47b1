"""Graceful drain of one gateway on SIGTERM (a rolling restart, a node drain, a scale-down).

The pod leaves the Service's endpoints as it starts terminating (the chart's preStop sleep lets that
reach every node first); then the gateway stops listening for SSH, answers the web door's /readyz and
every new request with 503, and tells each attached terminal, in one line, that it is restarting and
how to come back (`orz cloud attach` does that by itself on the disconnect below). Connections that
are open keep running until they end or the drain deadline (ORZ_GATEWAY_DRAIN_S) passes, or a second
signal arrives; the ones left then end with an SSH disconnect naming the reason. The session itself
runs on its runner and never notices: only the path through this gateway goes away.

RESTARTING (api.schemas.GATEWAY_RESTARTING) is what `orz cloud attach` looks for in ssh's output
(cli/reconnect.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from api.schemas import GATEWAY_RESTARTING
from gateway import metrics

log = logging.getLogger(__name__)

RESTARTING = GATEWAY_RESTARTING
# How often the drain looks at what is still open (and updates the draining gauge).
POLL_S = 0.5


def terminal_notice(session_id: str) -> str:
    """The line an attached terminal shows when the drain starts (ASCII: any terminal, any locale)."""
    return (f"\r\n[orz] {RESTARTING}; your session keeps running - reconnect with "
            f"`orz cloud attach {session_id}` (or it reconnects by itself)\r\n")


def closing_notice(session_id: str) -> str:
    """The line an attached terminal shows as the deadline ends its connection. (OpenSSH closes the
    session when its channel closes and may never print the disconnect message itself.)"""
    return (f"\r\n[orz] {RESTARTING}: this connection ends now; your session keeps running - reconnect with "
            f"`orz cloud attach {session_id}`\r\n")


def disconnect_reason(session_id: str) -> str:
    """The SSH disconnect message at the deadline (ssh prints it as `Received disconnect ...: <this>`)."""
    if session_id:
        return f"orz: {RESTARTING}; reconnect with `orz cloud attach {session_id}`"
    return f"orz: {RESTARTING}; connect again"


def web_refusal() -> str:
    return f"orz: {RESTARTING}; try again in a moment"


async def wait_drained(open_count: Callable[[], int], deadline_s: float, stop: Awaitable[object]) -> str:
    """Wait until nothing is open, the deadline passes or ``stop`` completes; say which ("drained",
    "deadline", "signal"). Keeps the draining gauge current meanwhile."""
    stopper = asyncio.ensure_future(stop)
    ends = time.monotonic() + deadline_s
    try:
        while True:
            left = open_count()
            metrics.draining(left)
            if left == 0:
                return "drained"
            remaining = ends - time.monotonic()
            if remaining <= 0:
                return "deadline"
            done, _ = await asyncio.wait({stopper}, timeout=min(POLL_S, remaining))
            if done:
                return "signal"
    finally:
        stopper.cancel()
        metrics.draining(0)
