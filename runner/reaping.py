"""Child processes the runner waits for are reaped even when the wait is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def reaped(proc: asyncio.subprocess.Process, waiting: Awaitable[T], *, group: bool = False) -> T:
    """Await ``waiting`` (``proc.communicate()``, ``proc.wait()``, ...). Cancelled, kill ``proc`` (its whole
    process group with ``group``) and wait for it before the cancellation goes on."""
    try:
        return await waiting
    except asyncio.CancelledError:
        # A process object dropped before its child is reaped leaves a zombie behind, and, once the event
        # loop is closed, a "subprocess N is still running" ResourceWarning at garbage collection.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        await proc.wait()
        raise
