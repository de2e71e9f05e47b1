"""`orz cloud replay ID`: play a session's pane recording (asciicast v2) in this terminal, or save it.

Playback writes each output event's text to stdout at its recorded time (``--speed`` divides the pauses,
``--idle-limit`` caps each one). The terminal is not resized: a recording made at another size may wrap.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import click

from cli.attach import check_session_id
from cli.completion import complete_session_ids
from cli.connect import client, cloud_command
from cli.errors import EXIT_USAGE, CliError


@dataclass(frozen=True)
class Cast:
    """A parsed recording: its header and its events as (time, kind, data)."""

    header: dict[str, Any]
    events: list[tuple[float, str, str]]


def parse_cast(data: bytes) -> Cast:
    """Parse asciicast v2; a last line cut off (read while the runner wrote it) is left out."""
    lines = data.decode("utf-8", "replace").splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise CliError("the recording is not asciicast v2 (its first line is not a version 2 header)")
    events = []
    for line in lines[1:]:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if (isinstance(event, list) and len(event) == 3 and isinstance(event[0], int | float)
                and isinstance(event[1], str) and isinstance(event[2], str)):
            events.append((float(event[0]), event[1], event[2]))
    return Cast(header, events)


def schedule(cast: Cast, speed: float = 1.0, idle_limit: float | None = None) -> Iterator[tuple[float, str]]:
    """Each output event's text with the pause before it: capped at ``idle_limit``, divided by ``speed``."""
    last = 0.0
    for at, kind, data in cast.events:
        if kind != "o":
            continue
        pause = max(0.0, at - last)
        last = max(last, at)
        if idle_limit is not None:
            pause = min(pause, idle_limit)
        yield pause / speed, data


# What a recording may make this terminal do: draw. The pane's bytes are the program's own, recorded before
# tmux (which the attached user sees through) filtered them, so they may hold sequences that act beyond
# the screen: OSC 52 writes the clipboard, OSC 0/2 the title, DCS/APC reach terminal features, and
# queries (device attributes, cursor and title reports) make the terminal type answers into the input,
# which the shell reads as a command line after replay exits. Those are dropped, split across events or not.
_ESC_KEPT = frozenset("78DEHMc=>")  # save/restore cursor, index, reverse index, tab set, reset, keypad
_ESC_CHARSET = frozenset("()*+")  # charset designations take one more character
_ESC_STRING = frozenset("]P_^X")  # OSC, DCS, APC, PM, SOS: up to BEL or ST, all dropped
_CSI_KEPT = frozenset("@ABCDEFGHIJKLMPSTXZ`abdefgmrsu")  # drawing, erasing, scrolling, SGR (m)
# Private modes (CSI ? n h/l) that only change how the screen looks: cursor keys (1), autowrap (7), blink
# and show the cursor (12, 25), the alternate screen (47, 1047-1049). Mouse and focus reporting, bracketed
# paste and the like would have the terminal send input.
_PRIVATE_MODES_KEPT = frozenset({"1", "7", "12", "25", "47", "1047", "1048", "1049"})
_C0_KEPT = frozenset("\b\t\n\r")


class ScreenOnly:
    """Filters a stream of terminal output (fed in pieces) down to what draws on the screen."""

    def __init__(self) -> None:
        self._state = "text"  # text | esc | charset | csi | string | string_esc
        self._seq = ""

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            out.append(self._step(ch))
        return "".join(out)

    def _step(self, ch: str) -> str:
        state = self._state
        if state == "text":
            if ch == "\x1b":
                self._state, self._seq = "esc", ch
                return ""
            code = ord(ch)
            return "" if (code < 0x20 and ch not in _C0_KEPT) or 0x7F <= code <= 0x9F else ch
        if state == "esc":
            self._seq += ch
            if ch == "[":
                self._state = "csi"
            elif ch in _ESC_STRING:
                self._state = "string"
            elif ch in _ESC_CHARSET:
                self._state = "charset"
            else:
                self._state = "text"
                return self._seq if ch in _ESC_KEPT else ""
            return ""
        if state == "charset":
            self._state = "text"
            return self._seq + ch if " " < ch < "\x7f" else ""
        if state == "csi":
            self._seq += ch
            if "@" <= ch <= "~":
                self._state = "text"
                return self._seq if _csi_kept(self._seq) else ""
            if not " " <= ch <= "?" or len(self._seq) > 64:  # not a CSI byte, or absurdly long: drop it all
                self._state = "text"
            return ""
        if state == "string":
            if ch == "\x07":
                self._state = "text"
            elif ch == "\x1b":
                self._state = "string_esc"
            return ""
        # string_esc: ESC \ ends the string; any other ESC starts a sequence afresh
        if ch == "\\":
            self._state = "text"
            return ""
        self._state = "text"
        return self._step("\x1b") + self._step(ch)


def _csi_kept(seq: str) -> bool:
    params, final = seq[2:-1], seq[-1]
    if final in "hl":
        if params.startswith("?"):
            return all(mode in _PRIVATE_MODES_KEPT for mode in params[1:].split(";"))
        return params == "4"  # insert mode
    return final in _CSI_KEPT and not any(c in params for c in "<=>?!$\"' ")


def play(cast: Cast, out: BinaryIO, speed: float, idle_limit: float | None,
         sleep: Callable[[float], None] = time.sleep) -> None:
    screen = ScreenOnly()
    for pause, text in schedule(cast, speed, idle_limit):
        if pause > 0:
            out.flush()
            sleep(pause)
        out.write(screen.feed(text).encode("utf-8", "replace"))
    out.flush()


def save(path: Path, data: bytes) -> None:
    """Write the recording readable by its owner only (what the agent printed may be secret)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}", EXIT_USAGE) from None


def _positive(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise click.BadParameter("must be more than 0", param=param)
    return value


@click.command("replay")
@click.argument("session_id", metavar="ID", callback=lambda _c, _p, v: check_session_id(v),
                shell_complete=complete_session_ids)
@click.option("--speed", metavar="N", type=float, default=1.0, show_default=True, callback=_positive,
              help="Play this many times faster.")
@click.option("--idle-limit", metavar="S", type=float, default=None, callback=_positive,
              help="Cap every pause at this many seconds (default: the recorded pauses, as long as they were).")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, allow_dash=True),
              help="Save the recording (.cast) to this file ('-': stdout) instead of playing it.")
@click.option("--previous", is_flag=True, help="The part before the current one (kept when the recording "
                                                "reached its size cap).")
@cloud_command
async def replay(session_id: str, speed: float, idle_limit: float | None, output: str | None,
                 previous: bool) -> None:
    """Play what the session's agent pane showed, with its timing, in this terminal.

    Recordings hold whatever the agent printed, secrets included: share a saved .cast with care."""
    async with client() as api:
        data = await api.recording(session_id, previous=previous)
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if output:
        save(Path(output), data)
        click.echo(f"saved {len(data)} bytes to {output} (asciicast v2: `asciinema play {output}` plays it too)",
                   err=True)
        return
    cast = parse_cast(data)
    width, height = cast.header.get("width"), cast.header.get("height")
    click.echo(f"replaying {session_id} (recorded at {width}x{height}; Ctrl-C stops)", err=True)
    try:
        play(cast, sys.stdout.buffer, speed, idle_limit)
    except KeyboardInterrupt:
        pass
    finally:
        if sys.stdout.isatty():
            sys.stdout.buffer.write(b"\x1b[0m\r\n")  # the recording may end in the middle of a colour
            sys.stdout.buffer.flush()
    click.echo("end of the recording", err=True)


COMMANDS = [replay]
