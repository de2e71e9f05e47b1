"""Child processes the runner (and the CLI) waits for are reaped even when the wait is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def _send(proc: asyncio.subprocess.Process, signum: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)


async def reaped(proc: asyncio.subprocess.Process, waiting: Awaitable[T], *, group: bool = False,
                 grace_s: float = 0.0) -> T:
    """Await ``waiting`` (``proc.communicate()``, ``proc.wait()``, ...). Cancelled, kill ``proc`` (its whole
    process group with ``group``) and wait for it before the cancellation goes on. With ``grace_s``, SIGTERM
    first, and SIGKILL only if it still runs that much later."""
    try:
        return await waiting
    except asyncio.CancelledError:
        # A process object dropped before its child is reaped leaves a zombie behind, and, once the event
        # loop is closed, a "subprocess N is still running" ResourceWarning at garbage collection.
        if grace_s > 0:
            _send(proc, signal.SIGTERM, group)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace_s)
        _send(proc, signal.SIGKILL, group)  # the group's other members too, if its leader went first
        await proc.wait()
        raise
