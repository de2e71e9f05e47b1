"""Progress while a session starts: state changes, events and the init log, until running or failed."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable

from api import schemas
from api.client import ApiClient, ApiError
from api.schemas import INIT_LOG_EARLIER_TITLE, INIT_LOG_TITLE
from cli.errors import CliError
from cli.output import event_line, printable, printable_log

POLL_INTERVAL_S = 0.5
GIVE_UP_STATES = {"stopping", "stopped", "deleting", "deleted"}


class LogFollower:
    """Prints only the new part of a log the API returns whole (or as a moving tail).

    The local provider's log is titled parts ("== init log ==", then "== runner log =="), each of which
    grows on its own: a part is followed by itself, and its title is printed again when the output
    moves back to it, so a line that grew in the first part does not reprint everything after it.
    After a restart the init log's lines of earlier starts move under a title of their own, before "== init
    log ==": the two are followed as the one init log they are, so lines already printed are not again."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.shown = ""
        self._parts: dict[str | None, str] = {}
        self._last_title: str | None = None

    def update(self, text: str) -> None:
        if not text or text == self.shown:
            return
        self.shown = text
        for title, body, earlier in _followed_parts(text):
            old = self._parts.get(title, "")
            if body == old:
                continue
            new = body[len(old):] if body.startswith(old) else _after_overlap(old, body)
            self._parts[title] = body
            at = len(body) - len(new)  # new is what ends body
            if at < earlier:  # it begins in the earlier starts' lines: those first, under their title
                self._print(INIT_LOG_EARLIER_TITLE, body[at:earlier])
                new = body[earlier:]
            self._print(title, new)

    def _print(self, title: str | None, new: str) -> None:
        if not new.strip("\n"):
            return
        if title is not None and title != self._last_title:
            self.emit(printable_log(title))
        self._last_title = title
        self.emit(printable_log(new.rstrip("\n")))


def _followed_parts(text: str) -> list[tuple[str | None, str, int]]:
    """(title, body, n) for each part of text to follow, the init log's earlier starts and this start's as one
    part under INIT_LOG_TITLE whose first n characters are the earlier starts' (n is 0 for other parts)."""
    out: list[tuple[str | None, str, int]] = []
    earlier = ""
    for title, body in _titled_parts(text):
        if title == INIT_LOG_EARLIER_TITLE:
            earlier = body
        elif title == INIT_LOG_TITLE:
            out.append((title, earlier + body, len(earlier)))
            earlier = ""
        else:
            out.append((title, body, 0))
    if earlier:  # earlier starts' lines without this start's part (a tail that cut it off): shown as they are
        out.append((INIT_LOG_EARLIER_TITLE, earlier, 0))
    return out


_TITLE = re.compile(r"^== [^=\n]+ ==$")


def _titled_parts(text: str) -> list[tuple[str | None, str]]:
    """(title, body) for each "== title ==" part of text, in order; text before any title has None."""
    parts: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")):
            parts.append((line.rstrip("\n"), []))
        else:
            parts[-1][1].append(line)
    # The API joins parts with a blank line; a body that grows must still start with what it was.
    return [(title, "".join(lines).rstrip("\n") + "\n") for title, lines in parts if "".join(lines).strip()]


def _after_overlap(old: str, new: str) -> str:
    """The part of new after its longest run of leading lines that ends old (the tail window moved)."""
    old_lines, new_lines = old.splitlines(keepends=True), new.splitlines(keepends=True)
    if new_lines:
        for i, line in enumerate(old_lines):
            overlap = old_lines[i:]
            if line == new_lines[0] and new_lines[:len(overlap)] == overlap:
                return "".join(new_lines[len(overlap):])
    return new


async def wait_until_running(api: ApiClient, session_id: str, emit: Callable[[str], None], *,
                             timeout_s: float, interval_s: float = POLL_INTERVAL_S,
                             show: Callable[[str], None] | None = None) -> schemas.Instance:
    """Poll status (and the init log) until the session runs; fail with one line otherwise.

    ``show`` gets a one-line summary on every poll (the status line of a terminal)."""
    started = time.monotonic()
    deadline = started + timeout_s
    seen: set[tuple[object, ...]] = set()
    log = LogFollower(emit)
    while True:
        status = await api.instance_status(session_id)
        for event in status.events:
            key = (event.at, event.kind, event.to_state, event.message)
            if key not in seen:
                seen.add(key)
                emit(event_line(event))
        inst = status.instance
        if show is not None:
            show(f"session {session_id} is {inst.status} ({time.monotonic() - started:.0f} s; Ctrl-C stops waiting)")
        with contextlib.suppress(ApiError):  # the init log is a nicety; the state is what matters
            log.update((await api.logs(session_id)).init_log)
        if inst.status == "running":
            return inst
        if inst.status == "failed":
            raise CliError(f"session {session_id} failed: {printable(inst.reason or 'no reason given')}; "
                           f"see orz cloud logs {session_id}")
        if inst.status in GIVE_UP_STATES:
            raise CliError(f"session {session_id} is {inst.status}; it will not start on its own")
        if time.monotonic() >= deadline:
            raise CliError(f"session {session_id} is still {inst.status} after {timeout_s:g} s; "
                           f"check orz cloud status {session_id}")
        await asyncio.sleep(interval_s)
