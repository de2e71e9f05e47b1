"""The agent pane's recording, as asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/).

tmux pipes the pane's output (``pipe-pane -O``) into a FIFO the runner made in its state directory; the
runner reads it, timestamps each chunk and appends ``[t, "o", text]`` lines, plus ``[t, "r", "WxH"]``
when the window changes size (tmux's window-resized hook). The only shell command involved is ``cat``
into that FIFO's quoted path: the pane's bytes never meet a shell, and no user input is in the command.

Each part is at most ``max_bytes``: the line that would go past it first moves the part to
``recording.1.cast`` (replacing the one there) and starts a new part with its own header. A runner that
starts again (wake of a stopped session) appends to the current part, its times counted from that
part's header, so the stop shows as one long pause (``orz cloud replay --idle-limit`` shortens it).

These files are the runner's spool, not where anyone reads the recording: ``Uploader`` sends their new
bytes to the API every few seconds and once more when the runner stops, and the API stores and serves
them (api/instances/recordings.py has the protocol). Each part has a random name, kept beside it in
``recording.part``, so a runner that starts again on the same files goes on with the same part upstream;
one that starts without them (a new Pod) starts a new part, and the API keeps the one before as the
previous part. What a runner had not uploaded when it was killed is lost.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import secrets
import shlex
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.client import ApiClient, ApiError
from api.schemas import RECORDING_PART_RE, RECORDING_UPLOAD_MAX_BYTES, STATE_RECORDING, STATE_RECORDING_PREVIOUS
from runner.tmux import RESIZED, Tmux

log = logging.getLogger(__name__)

FIFO = "recording.fifo"
# The name of the current part (recording.cast), written before the part's first byte.
PART_FILE = "recording.part"
# How often the uploader sends what the pane printed since its last upload (when it printed anything).
UPLOAD_INTERVAL_S = 3.0
# The last upload when the runner stops: bounded, so it and the WIP save (runner/work.py) fit the grace period.
FINAL_UPLOAD_S = 3.0
# Uploads in one round (two parts at the cap, 8 MiB each by default, in 128 KiB uploads, with room to spare).
MAX_UPLOADS_AT_ONCE = 256
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
        self.part_file = directory / PART_FILE
        # The random names of the current and previous parts (what the API knows them by).
        self.part_id = ""
        self.previous_id = ""
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
        try:
            part_id = self.part_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            part_id = ""
        if not RECORDING_PART_RE.match(part_id):
            return False  # a part without its name cannot be continued upstream: a new part then
        last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            line: Any = json.loads(last)
        except ValueError:
            return False
        self._start = float(header.get("timestamp", 0))
        self._last_t = float(line[0]) if isinstance(line, list) and line else 0.0
        self._bytes = end
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.part_id = part_id
        return True

    @property
    def written(self) -> int:
        """Bytes of the current part written so far (whole lines only)."""
        return self._bytes

    def _new_part(self) -> None:
        self.close()
        # The name first: a crash before the new file leaves a name no part upstream has (a new part
        # there, never bytes of another file appended to the old one).
        self.previous_id, self.part_id = self.part_id, secrets.token_urlsafe(12)
        tmp = self.part_file.with_suffix(".tmp")
        tmp.write_text(self.part_id + "\n", encoding="ascii")
        os.replace(tmp, self.part_file)
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


class Uploader:
    """Sends the recording's new bytes to the API (``POST /internal/v1/instances/{id}/recording``).

    It follows the CastFile: the part it is sending, and how much of it the API has (``acked``). After a
    rotation it finishes the previous part before it starts the new one; a 409 says where the API's copy
    ends, and it sends again from there (or its part from 0 when the API's current part is another)."""

    def __init__(self, client: ApiClient, session_id: str, cast: CastFile,
                 interval_s: float = UPLOAD_INTERVAL_S) -> None:
        self.client = client
        self.session_id = session_id
        self.cast = cast
        self.interval_s = interval_s
        self.part = ""
        self.acked = 0
        self.off = False  # the org turned recording off: nothing more is sent
        self.failed = False  # the last upload did not reach the API (or it failed): tried again later
        self._skip = ""  # a part the API will not take more of (over its cap): left until the next one
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recording-upload")

    async def close(self, timeout_s: float = FINAL_UPLOAD_S) -> None:
        """Stop the periodic uploads and send what is left (bounded by ``timeout_s``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                for attempt in range(3):
                    await self.send_all()
                    if not self.failed:
                        return
                    await asyncio.sleep(0.3 * (attempt + 1))  # the API restarting or briefly away

    async def send_all(self) -> None:
        """Send everything the API lacks, chunk by chunk, until done or refused."""
        for _ in range(MAX_UPLOADS_AT_ONCE):
            if await self.upload_once():
                return

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.send_all()
            except Exception:  # a bug here must not end the recording's uploads for good
                log.exception("recording upload failed")

    def _pending(self) -> tuple[Path, int] | None:
        """The file and end of the part to send now, after following any rotation; None: nothing to send."""
        cast = self.cast
        if self.part not in (cast.part_id, cast.previous_id) or not self.part:
            self.part, self.acked = cast.part_id, 0  # first upload, or two rotations since the last one
        if self.part == cast.previous_id and self.part != cast.part_id:
            try:
                end = cast.previous.stat().st_size
            except OSError:
                end = 0
            if self.acked < end and self.part != self._skip:
                return cast.previous, end
            self.part, self.acked = cast.part_id, 0  # the previous part is all there: on to the new one
        if not self.part or self.part == self._skip or self.acked >= cast.written:
            return None
        return cast.path, cast.written

    async def upload_once(self) -> bool:
        """Send one chunk the API lacks; True when there is nothing more to send (or it must not be sent)."""
        if self.off:
            return True
        pending = self._pending()
        if pending is None:
            return True
        path, end = pending
        part, offset = self.part, self.acked
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(min(end - offset, RECORDING_UPLOAD_MAX_BYTES))
        except OSError as exc:
            log.warning("recording upload: cannot read %s: %s", path.name, exc)
            self._skip = part
            return True
        if not data:
            return True
        self.failed = False
        try:
            ack = await self.client.upload_recording(self.session_id, part, offset, data)
        except ApiError as exc:
            return self._refused(part, offset, exc)
        if self.part == part:
            self.acked = ack.offset
        return False

    def _refused(self, part: str, offset: int, exc: ApiError) -> bool:
        if exc.status == 409 and self.part == part:
            theirs, at = exc.body.get("part"), exc.body.get("offset")
            if theirs == part and isinstance(at, int) and at != offset:
                self.acked = at  # (an earlier try landed though its answer was lost)
                return False
            if theirs != part and offset != 0:
                self.acked = 0  # the API's current part is another one: this one goes up whole, as new
                return False
            self._skip = part
            log.warning("recording upload: the API will not take part %s (%s)", part, exc.detail)
            return True
        if exc.status == 403:
            self.off = True
            log.info("recording upload: %s; nothing more is sent", exc.detail)
            return True
        if exc.status == 413:
            self._skip = part
            log.warning("recording upload: %s", exc.detail)
            return True
        self.failed = exc.status == 0 or exc.status >= 500
        log.warning("recording upload failed: %s", exc.detail)
        return True  # tried again at the next interval
