"""How `orz cloud` shows things: session tables (80 columns), quota line, --json, progress lines."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.status import Status
from rich.table import Table

from api import schemas

STATUS_STYLE = {
    "running": "green", "starting": "yellow", "pending": "yellow", "unhealthy": "red", "failed": "red",
    "stopping": "dim", "stopped": "dim", "deleting": "dim", "deleted": "dim",
}
# Terminals narrower than this still get an 80-column table (the terminal wraps); wider ones no more.
TABLE_WIDTH = 80


def printable(text: str) -> str:
    """Text the server relays from elsewhere (a runner's failure reason, a program's exit message, a
    receiver's answer) as one line a terminal cannot act on: every control character, escape sequences'
    ESC included, shown as U+FFFD. A session's runner and agent are not trusted, and an org admin reads
    their members' sessions: an OSC 52 or title sequence in a reason must not reach the admin's terminal."""
    return schemas.scrub_controls(text, "line")


# An init log keeps its lines and colours (SGR), unlike `printable`'s one line; every other control a terminal
# would act on (OSC 52 writes the clipboard, OSC 0 the title, CSI clears the screen or moves the cursor over
# what the user read) is shown in caret notation instead.
_SGR = r"\x1b\[[0-9;:]*m"
_LOG_CONTROL = re.compile(f"({_SGR})|[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f]")


def _as_shown(match: re.Match[str]) -> str:
    if match.group(1):
        return match.group(1)
    code = ord(match.group())
    if code < 0x20:
        return "^" + chr(code + 0x40)  # as cat -v: ESC is ^[
    return "^?" if code == 0x7F else "\ufffd"


def printable_log(text: str) -> str:
    """A log a session wrote (its init log) for the terminal: tab, newline, CR and colour kept, every other
    control character shown instead of obeyed. The session's code is not the user reading it."""
    return _LOG_CONTROL.sub(_as_shown, text)


def stdout() -> Console:
    return Console(highlight=False, soft_wrap=True, width=TABLE_WIDTH if not sys.stdout.isatty() else None)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


# The status line on screen while there is one (rich's Status), for note() to print above.
_shown: list[Status] = []


@contextlib.contextmanager
def status_line(first: str) -> Iterator[Callable[[str], None] | None]:
    """A spinner line on a terminal's stderr that the caller updates (None when stderr is not a terminal:
    logs and pipes get only the lines printed above it, by note())."""
    if not sys.stderr.isatty():
        yield None
        return
    with stderr().status(first) as live:
        _shown.append(live)
        try:
            yield lambda text: live.update(text)
        finally:
            _shown.remove(live)


def note(message: str) -> None:
    """A line on stderr, above the status line while one is shown. Written past rich, it landed after the
    spinner's text on the spinner's line, and stayed there when the spinner moved down."""
    if _shown:
        _shown[-1].console.print(message, markup=False, highlight=False, emoji=False)
    else:
        click.echo(message, err=True)


def print_table(table: Table) -> None:
    """Print a table without rich's trailing padding (cleaner to paste, grep and diff)."""
    console = stdout()
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        console.file.write(line.rstrip() + "\n")


def relative(at: datetime | None, now: datetime | None = None) -> str:
    """'just now', '5m ago', '3h ago', '2d ago'; '-' for never. At most 8 characters."""
    if at is None:
        return "-"
    now = now or datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    seconds = int((now - at).total_seconds())
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{min(seconds // size, 9999)}{unit} ago"
    return "just now"


def last_active(inst: schemas.Instance) -> datetime | None:
    return inst.last_activity_at or inst.started_at


AGENT_LABELS = {"working": "working", "needs_input": "needs input", "idle": "idle"}
# Where the runner is (or may still be) up, so an agent's "working" or "needs input" is about now.
LIVE_STATUSES = frozenset({"running", "unhealthy"})


def agent_label(inst: schemas.Instance) -> str:
    """The agent's state in at most 11 characters (the list's AGENT column); `-` for a stopped session, whose
    last report (say "needs input") is no longer true: its program starts afresh when it wakes."""
    if inst.agent_state == "exited":
        return f"exited {inst.agent_exit_code}" if inst.agent_exit_code is not None else "exited"
    if inst.status not in LIVE_STATUSES:
        return "-"
    return AGENT_LABELS.get(inst.agent_state or "", "-")


def at_risk(work: schemas.WorkState | None) -> bool:
    """Work a delete would lose (the API's own rule: it refuses such a delete unless forced)."""
    return bool(work and work.at_risk)


def work_line(work: schemas.WorkState) -> str:
    return work.summary()


def instances_table(instances: list[schemas.Instance], now: datetime | None = None) -> Table:
    """id (<= 32), status (<= 9), agent (<= 11), tier (<= 6), last active (<= 11): 69 + gaps <= 80.

    The creation time is in `status` and --json; the agent's state earned its column."""
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), show_edge=False, header_style="bold")
    table.add_column("ID", no_wrap=True, max_width=32)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("AGENT", no_wrap=True)
    table.add_column("TIER", no_wrap=True)
    table.add_column("LAST ACTIVE", no_wrap=True)
    for inst in instances:
        agent = agent_label(inst)
        if inst.agent_state == "needs_input":
            agent = f"[bold yellow]{agent}[/]"
        table.add_row(inst.id, f"[{STATUS_STYLE.get(inst.status, '')}]{inst.status}[/]", agent, inst.tier,
                      relative(last_active(inst), now))
    return table


def span(seconds: int) -> str:
    """'30 min', '2 h', '7 days', '90 s': the largest unit that divides it, or that it reaches."""
    for unit, size in ((" day", 86400), (" h", 3600), (" min", 60)):
        if seconds >= size and (seconds % size == 0 or seconds >= 10 * size):
            count = round(seconds / size)
            return f"{count}{unit}{'s' if unit == ' day' and count != 1 else ''}"
    return f"{seconds} s"


def limits_line(org: schemas.MeOrg) -> str | None:
    """When an idle session stops and a stopped one is deleted (None from a server that does not say)."""
    if org.idle_timeout_s is None or org.retention_s is None:
        return None
    return (f"a session with no activity for {span(org.idle_timeout_s)} is stopped (its workspace kept); "
            f"a stopped one is deleted after {span(org.retention_s)}")


def quota_line(quota: schemas.Quota) -> str:
    noun = "session" if quota.limit == 1 else "sessions"
    return f"{quota.active} of {quota.limit} active {noun} ({quota.plan} plan)"


def to_json(model: BaseModel) -> str:
    """The documented --json form: the API's schema, fields in schema order, times in RFC 3339 UTC."""
    return json.dumps(model.model_dump(mode="json"), indent=2)


def event_line(event: schemas.InstanceEvent) -> str:
    at = event.at.astimezone(UTC).strftime("%H:%M:%S")
    change = f"{event.from_state or '-'} -> {event.to_state}" if event.to_state else event.kind
    message = f"  {event.message}" if event.message else ""
    return printable(f"{at}  {change}{message}")


def program_exit_line(program_exit: schemas.ProgramExit, session_id: str) -> str:
    at = program_exit.at.astimezone(UTC).strftime("%H:%M:%S")
    return f"{printable(program_exit.message)} at {at}; attaching restarts it (orz cloud attach {session_id})"


def describe(inst: schemas.Instance) -> list[tuple[str, Any]]:
    """The fields `orz cloud status` shows, in order."""
    rows: list[tuple[str, Any]] = [
        ("id", inst.id), ("status", inst.status + (f" ({inst.reason})" if inst.reason else "")),
        ("tier", inst.tier), ("repo", inst.repo_url or "-"), ("branch", inst.branch or "-"),
        ("program", inst.program or "-"), ("created", inst.created_at.astimezone(UTC).isoformat()),
        ("last active", relative(last_active(inst))), ("attached", inst.attached_clients), ("ssh", inst.ssh),
    ]
    if inst.secrets:
        rows.append(("secrets", ", ".join(inst.secrets)))
    if inst.agent_state:
        label = agent_label(inst)
        if label == "-":  # stopped: what it last said, as history
            label = f"{AGENT_LABELS.get(inst.agent_state, inst.agent_state)} (before the session stopped)"
        rows.append(("agent", label + (f": {inst.agent_message}" if inst.agent_message else "")))
    if inst.work:
        rows.append(("work", work_line(inst.work)))
    return [(name, printable(value) if isinstance(value, str) else value) for name, value in rows]
