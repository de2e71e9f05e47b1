"""Run a program on a fresh pseudo-terminal and move raw bytes between it and an SSH channel."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pty
import signal
import struct
import termios
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from runner.reaping import reaped

# A pty hands over at most about 4 KiB per read (its line discipline's buffer). A read that comes back
# at least this full means a program is streaming: what else is already there is read at once, so one
# SSH packet carries up to READ_MAX instead of one per 4 KiB (measured: 16x fewer packets, and as many
# fewer trips through asyncssh here and in the gateway). A keystroke's echo is a few bytes: sent at once.
STREAMING_READ = 2048
READ_MAX = 65536


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", max(rows, 1), max(cols, 1), 0, 0))


def _controlling_tty() -> None:
    # Runs in the child after setsid (start_new_session): make the pty its controlling terminal,
    # so job control, ^C and SIGWINCH behave as under sshd.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyChild:
    """One program on its own pty; output is pushed to ``on_output`` as it arrives."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int,
                 on_output: Callable[[bytes], None]) -> None:
        self.proc = proc
        self.master = master
        self._on_output = on_output
        self._eof = asyncio.Event()
        self._hung_up = False
        asyncio.get_running_loop().add_reader(master, self._readable)

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], cols: int, rows: int,
                    on_output: Callable[[bytes], None]) -> PtyChild:
        master, slave = pty.openpty()
        try:
            _set_winsize(master, cols, rows)
            os.set_blocking(master, False)
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=dict(env), stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True, preexec_fn=_controlling_tty,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            # Only the child keeps the slave open, so the master reads EIO once it is gone.
            os.close(slave)
        return cls(proc, master, on_output)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, READ_MAX)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""
        if len(data) >= STREAMING_READ:
            data = self._read_more(data)
        if data:
            self._on_output(data)
        else:
            asyncio.get_running_loop().remove_reader(self.master)
            self._eof.set()

    def _read_more(self, first: bytes) -> bytes:
        """`first` and whatever else the pty holds now, up to READ_MAX (the end of output is left to the
        next call, which reads EIO once the program is gone)."""
        parts, size = [first], len(first)
        while size < READ_MAX:
            try:
                more = os.read(self.master, READ_MAX - size)
            except OSError:  # empty for now (BlockingIOError), or the program is gone (EIO)
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts) if len(parts) > 1 else first

    def pause_reading(self) -> None:
        if self.master >= 0 and not self._eof.is_set():
            asyncio.get_running_loop().remove_reader(self.master)

    def resume_reading(self) -> None:
        if self.master >= 0 and not self._eof.is_set():
            asyncio.get_running_loop().add_reader(self.master, self._readable)

    def write(self, data: bytes) -> None:
        # A keystroke fits the pty's input queue: one write, no view to make (measured ~0.3 µs of ~2.3).
        try:
            written = os.write(self.master, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return
        if written == len(data):
            return
        view = memoryview(data)[written:]
        while view:
            try:
                view = view[os.write(self.master, view):]
            except BlockingIOError:
                # The pty's input queue is full (a paste into a busy program): let it drain.
                os.set_blocking(self.master, True)
                try:
                    view = view[os.write(self.master, view):]
                finally:
                    os.set_blocking(self.master, False)
            except OSError:
                return

    def resize(self, cols: int, rows: int) -> None:
        with contextlib.suppress(OSError):
            _set_winsize(self.master, cols, rows)

    def signal(self, signum: int) -> None:
        killpg(self.proc.pid, signum)

    async def wait(self, time_limit: float | None = None) -> int:
        """Wait for exit and for the last output to be read; kill the program on timeout."""
        try:
            # Cancelled (the runner stopping), the program's group is killed and reaped before we go on.
            code = await reaped(self.proc, asyncio.wait_for(self.proc.wait(), time_limit), group=True)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            code = await self.proc.wait()
            raise
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._eof.wait(), 2.0)
            self.close()
        return code

    def close(self) -> None:
        if self.master >= 0:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = -1
            self._eof.set()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.signal(signal.SIGHUP)
            self.signal(signal.SIGKILL)

    def hang_up(self) -> None:
        """The client went away: SIGHUP now, as sshd's closed pty would, and SIGKILL what is left later."""
        if not self._hung_up:
            self._hung_up = True
            hang_up(self.proc)


# How long a program has to exit after its client went away (rsync keeps its --partial file meanwhile).
HANGUP_GRACE_S = 5.0


def killpg(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def hang_up(proc: asyncio.subprocess.Process, grace_s: float = HANGUP_GRACE_S) -> None:
    """SIGHUP the process group ``proc`` leads; SIGKILL it after ``grace_s`` if the leader still runs."""
    if proc.returncode is not None:
        return
    killpg(proc.pid, signal.SIGHUP)

    def kill_if_running() -> None:
        if proc.returncode is None:
            killpg(proc.pid, signal.SIGKILL)

    asyncio.get_running_loop().call_later(grace_s, kill_if_running)
