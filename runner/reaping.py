"""The runner's child processes: started with the standard library's semantics on any event loop, and
reaped even when a wait is cancelled.

On uvloop, children started through the loop (libuv) differ from asyncio's own loop in what a child gets:
each redirected stdin/stdout/stderr also stays open in the child as an extra inheritable descriptor (so a
daemon the child starts, such as the tmux server of `tmux new-session -d` or git's background gc, holds
the runner's pipe open and a wait for its end never returns), pipes are socketpairs (`/dev/stdin` cannot
be opened), and a ``preexec_fn`` runs before the new session and the redirections exist (a pty cannot
become the controlling terminal). ``spawn`` starts every child through ``subprocess.Popen`` (close_fds,
real pipes, setsid before ``preexec_fn``) under asyncio's own subprocess transport, as asyncio's loop does,
and learns of its exit from a pidfd (no waiting thread per child): the same children on either loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from asyncio import subprocess as aio_subprocess
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# asyncio internals ``spawn`` builds on (not public API): the Popen-based transport of asyncio's own loop,
# and what it calls when the child has exited. tests/runner/test_reaping.py fails naming any a Python
# release drops; until then ``spawn`` falls back to the loop's own subprocess support, with a warning.
_TRANSPORT = getattr(getattr(asyncio, "unix_events", None), "_UnixSubprocessTransport", None)
_TRANSPORT_STATE = ("_start", "_process_exited", "_wait", "get_pid", "close")


def missing_internals() -> list[str]:
    """The asyncio internals ``spawn`` relies on that this Python lacks."""
    if _TRANSPORT is None:
        return ["asyncio.unix_events._UnixSubprocessTransport"]
    return [f"_UnixSubprocessTransport.{name}" for name in _TRANSPORT_STATE if not hasattr(_TRANSPORT, name)]


async def spawn(program: str, *args: str, stdin: Any = None, stdout: Any = None, stderr: Any = None,
                **popen_kwargs: Any) -> aio_subprocess.Process:
    """``asyncio.create_subprocess_exec`` with ``subprocess.Popen``'s child semantics on any event loop."""
    loop = asyncio.get_running_loop()
    if missing_internals():
        log.warning("spawning through the event loop: this Python lacks %s", ", ".join(missing_internals()))
        return await asyncio.create_subprocess_exec(program, *args, stdin=stdin, stdout=stdout, stderr=stderr,
                                                    **popen_kwargs)
    protocol = aio_subprocess.SubprocessStreamProtocol(limit=2 ** 16, loop=loop)
    waiter = loop.create_future()
    assert _TRANSPORT is not None
    transport = _TRANSPORT(loop, protocol, [program, *args], False, stdin, stdout, stderr, 0, waiter=waiter,
                           **popen_kwargs)
    _watch_exit(loop, transport)
    try:
        await waiter  # the pipes are connected
    except BaseException:
        transport.close()
        await transport._wait()
        raise
    return aio_subprocess.Process(transport, protocol, loop)


def _watch_exit(loop: asyncio.AbstractEventLoop, transport: Any) -> None:
    """Tell ``transport`` its child's exit status once it has exited (and reap it)."""
    pid = transport.get_pid()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # a kernel or sandbox without pidfds: a thread waits instead, as asyncio's own does
        threading.Thread(target=_wait_in_thread, args=(loop, transport, pid), daemon=True).start()
        return

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        transport._process_exited(_reap(pid))

    loop.add_reader(pidfd, exited)


def _wait_in_thread(loop: asyncio.AbstractEventLoop, transport: Any, pid: int) -> None:
    code = _reap(pid, blocking=True)
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(transport._process_exited, code)


def _reap(pid: int, blocking: bool = False) -> int:
    """The exit code of ``pid`` (negative: killed by that signal); 255 when someone else reaped it."""
    try:
        done, status = os.waitpid(pid, 0 if blocking else os.WNOHANG)
        if not done:  # not yet (a pidfd is readable only once the child has exited: a moment at most)
            done, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 255  # as asyncio's own child watchers report a child reaped elsewhere
    return os.waitstatus_to_exitcode(status)


async def reaped(proc: aio_subprocess.Process, waiting: Awaitable[T], *, group: bool = False) -> T:
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

