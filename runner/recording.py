"""The agent pane's recording, as asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/).

tmux pipes the pane's output (``pipe-pane -O``) into a FIFO the runner made in its state directory; the
runner reads it, timestamps each chunk and appends ``[t, "o", text]`` lines, plus ``[t, "r", "WxH"]``
when the window changes size (tmux's window-resized hook). The only shell command involved is ``cat``
into that FIFO's quoted path: the pane's bytes never meet a shell, and no user input is in the command.

Each part is at most ``max_bytes``: the line that would go past it first moves the part to
``recording.1.cast`` (replacing the one there) and starts a new part with its own header. A runner that
starts again (wake of a stopped session) appends to the current part, its times counted from that
part's header, so the stop shows as one long pause (``orz cloud replay --idle-limit`` shortens it).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import shlex
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.schemas import STATE_RECORDING, STATE_RECORDING_PREVIOUS
from runner.tmux import RESIZED, Tmux

log = logging.getLogger(__name__)

FIFO = "recording.fifo"
# Bytes read from the FIFO at a time: one "o" event at most, ~6x that once JSON-escaped (RECORDING_MIN_BYTES
# leaves room for a few of those).
READ_SIZE = 4096
TERM = "xterm-256color"
DRAIN_S = 0.1


class CastFile:
    """The recording on disk: the current part and the previous one, each at most ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.path = directory / STATE_RECORDING
        self.previous = directory / STATE_RECORDING_PREVIOUS
        self.max_bytes = max_bytes
        self.clock = clock
        self.size = (0, 0)
        self._fd: int | None = None
        self._start = 0.0
        self._last_t = 0.0
        self._bytes = 0

    def open(self, width: int, height: int) -> None:
        """Append to the current part when it is a readable recording, else start a new one."""
        self.size = (width, height)
        resumed = self._resume()
        if resumed:
            self.resize(width, height)  # the size may have changed since (a new tmux server)
        else:
            if self.path.exists():
                os.replace(self.path, self.previous)  # unreadable (cut off mid-line): kept, not appended to
            self._new_part()

    def output(self, text: str) -> None:
        if text:
            self._event("o", text)

    def resize(self, width: int, height: int) -> None:
        self.size = (width, height)
        self._event("r", f"{width}x{height}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _resume(self) -> bool:
        """Open the current part for appending when its header and last line parse; say whether it did."""
        try:
            with self.path.open("rb") as f:
                header = json.loads(f.readline())
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(max(0, end - 2 * READ_SIZE * 8))
                tail = f.read()
        except (OSError, ValueError):
            return False
        if not isinstance(header, dict) or header.get("version") != 2 or not tail.endswith(b"\n"):
            return False
        last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            line: Any = json.loads(last)
        except ValueError:
            return False
        self._start = float(header.get("timestamp", 0))
        self._last_t = float(line[0]) if isinstance(line, list) and line else 0.0
        self._bytes = end
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return True

    def _new_part(self) -> None:
        self.close()
        now = self.clock()
        self._start = float(int(now))
        self._last_t = 0.0
        width, height = self.size
        header = json.dumps({"version": 2, "width": width, "height": height, "timestamp": int(now),
                             "env": {"TERM": TERM}}) + "\n"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._bytes = 0
        self._write(header.encode())

    def _event(self, kind: str, data: str) -> None:
        line = self._line(kind, data)
        if self._bytes + len(line) > self.max_bytes:
            self.close()
            os.replace(self.path, self.previous)
            self._new_part()
            line = self._line(kind, data)
        self._write(line)

    def _line(self, kind: str, data: str) -> bytes:
        # Times never go back (the clock may step); microseconds are as fine as a terminal needs.
        t = max(self._last_t, round(self.clock() - self._start, 6))
        self._last_t = t
        return (json.dumps([t, kind, data], ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        os.write(self._fd, data)  # one write per line: a reader never sees half an event of a finished write
        self._bytes += len(data)


class Recorder:
    """Records the session's pane while the runner runs: ``start`` before the program, ``stop`` after tmux."""

    def __init__(self, tmux: Tmux, directory: Path, max_bytes: int) -> None:
        self.tmux = tmux
        self.directory = directory
        self.fifo = directory / FIFO
        self.cast = CastFile(directory, max_bytes)
        self._fd: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._resizes: asyncio.Task[None] | None = None
        self._failed = False

    async def start(self, width: int, height: int) -> None:
        """Make the FIFO, read it, and have tmux pipe the pane into it from the program's start on."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISFIFO(self.fifo.lstat().st_mode):
                raise OSError(f"{self.fifo} exists and is not a FIFO")
            self.fifo.unlink()  # a fresh one: a writer of an earlier tmux server must not reach this one
        os.mkfifo(self.fifo, 0o600)
        # Read and write: the FIFO then never reports end-of-file when a writer goes (a respawned pane).
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            self.cast.open(width, height)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise
        asyncio.get_running_loop().add_reader(self._fd, self._readable)
        self.tmux.pane_pipe = f"exec cat >> {shlex.quote(str(self.fifo))}"
        self._resizes = asyncio.create_task(self._watch_resizes(), name="recording-resizes")

    async def pane_ready(self, started: bool) -> None:
        """After ``Tmux.ensure``: pipe a pane tmux did not just start, and note its real size."""
        if self._fd is None:
            return
        if not started:
            await self.tmux.pipe_pane()
        await self._check_size()

    async def stop(self) -> None:
        """Write what tmux piped before it went, and close the recording."""
        if self._resizes is not None:
            self._resizes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resizes
        if self._fd is None:
            return
        await asyncio.sleep(DRAIN_S)  # tmux's cat writes what it still holds as the server goes
        asyncio.get_running_loop().remove_reader(self._fd)
        while self._read_once():
            pass
        self._record(self._decoder.decode(b"", final=True))
        os.close(self._fd)
        self._fd = None
        self.cast.close()
        self.tmux.pane_pipe = None
        with contextlib.suppress(OSError):
            self.fifo.unlink()

    def _readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """Record one chunk of the FIFO; False when there was nothing to read."""
        assert self._fd is not None
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return False
        if not data:
            return False
        self._record(self._decoder.decode(data))
        return True

    def _record(self, text: str) -> None:
        if self._failed:
            return
        try:
            self.cast.output(text)
        except OSError as exc:
            # A full disk must not take the session down: the recording stops, the agent goes on.
            self._failed = True
            log.warning("recording stopped: %s", exc)

    async def _check_size(self) -> None:
        size = await self.tmux.pane_size()
        if size is not None and size != self.cast.size and not self._failed:
            try:
                self.cast.resize(*size)
            except OSError as exc:
                self._failed = True
                log.warning("recording stopped: %s", exc)

    async def _watch_resizes(self) -> None:
        while True:
            if not await self.tmux.wait_for(RESIZED):
                await asyncio.sleep(1.0)  # no tmux server right now (made again on the next attach)
                continue
            await self._check_size()
