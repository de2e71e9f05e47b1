"""`orz cloud watch [ID ...] [--notify] [--json]`: follow sessions' states and agents' states as they change.

It polls `GET /v1/instances` (one request per interval, whatever the number of sessions) and prints a line
per change. `--notify` also raises a desktop notification (notify-send) when an agent needs input, goes
idle or exits, or a session fails; without notify-send it rings the terminal bell.
"""

from __future__ import annotations

import asyncio
import html
import json
import shutil
import subprocess  # nosec B404  # notify-send, an argv list
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import click

from api import schemas
from cli import output
from cli.attach import check_session_id
from cli.connect import client, cloud_command
from cli.errors import EXIT_NOT_FOUND, CliError

NOTIFY_AGENT = frozenset({"needs_input", "idle", "exited"})
NOTIFY_STATUS = frozenset({"failed"})
MIN_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Seen:
    status: str
    agent_state: str | None
    agent_message: str | None
    agent_exit_code: int | None

    @classmethod
    def of(cls, inst: schemas.Instance) -> Seen:
        return cls(inst.status, inst.agent_state, inst.agent_message, inst.agent_exit_code)


def describe(inst: schemas.Instance) -> str:
    agent = output.agent_label(inst)
    live = inst.agent_state and agent != "-"  # a stopped session's last report is not news
    text = f"{inst.status}, agent {agent}" if live else inst.status
    if live and inst.agent_message:
        text += f": {inst.agent_message}"
    if inst.status == "failed" and inst.reason:
        text += f" ({inst.reason})"
    return output.printable(text)


def worth_notifying(before: Seen | None, inst: schemas.Instance) -> bool:
    if before is None:
        return False  # what was already so when watch started is no news
    agent_changed = (before.agent_state, before.agent_message) != (inst.agent_state, inst.agent_message)
    return ((agent_changed and inst.agent_state in NOTIFY_AGENT)
            or (before.status != inst.status and inst.status in NOTIFY_STATUS))


def notify(inst: schemas.Instance) -> None:
    """A desktop notification where notify-send exists, else the terminal bell."""
    binary = shutil.which("notify-send")
    title = f"orz: {inst.id} {output.agent_label(inst) if inst.agent_state else inst.status}"
    # Notification daemons read the body as markup (GNOME, KDE, dunst, mako): an agent's `<a href>` would be
    # a link to click and `<img src="file://...">` a local file shown, so its words go as text.
    body = html.escape(output.printable(inst.agent_message or inst.reason or describe(inst)), quote=False)
    if binary is not None:
        try:
            # "--": an agent's message starting with '-' is the body, not one of notify-send's options.
            done = subprocess.run([binary, "--app-name=orz", "--", title, body], capture_output=True, timeout=10,  # nosec B603
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0:
            return  # else no desktop session to show it (no D-Bus): the bell
    click.echo("\a", nl=False)
    sys.stdout.flush()


@click.command("watch")
@click.argument("session_ids", nargs=-1, metavar="[ID]...", callback=lambda _c, _p, v: [check_session_id(s) for s in v])
@click.option("--notify", "notify_on", is_flag=True,
              help="Desktop notification (notify-send, else the terminal bell) when an agent needs input, "
                   "goes idle or exits, or a session fails.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per change (see docs/cli.md).")
@click.option("--interval", metavar="S", type=click.FloatRange(MIN_INTERVAL_S), default=3.0, show_default=True,
              help="Seconds between polls of the API.")
@cloud_command
async def watch(session_ids: list[str], notify_on: bool, as_json: bool, interval: float) -> None:
    """Print each change of your sessions' states and their agents' states until Ctrl-C.

    The first lines are the sessions as they are now; then one line per change."""
    seen: dict[str, Seen] = {}
    wanted = set(session_ids)
    first = True
    async with client() as api:
        while True:
            listing = await api.list_instances()
            if first:
                _check_known(wanted, listing)
                first = False
            now = datetime.now(UTC)
            for inst in reversed(listing.instances):  # oldest first
                if wanted and inst.id not in wanted:
                    continue
                before = seen.get(inst.id)
                current = Seen.of(inst)
                if before == current:
                    continue
                seen[inst.id] = current
                if as_json:
                    click.echo(json.dumps({
                        "at": now.isoformat().replace("+00:00", "Z"), "id": inst.id, "status": inst.status,
                        "agent_state": inst.agent_state, "agent_message": inst.agent_message,
                        "agent_exit_code": inst.agent_exit_code,
                    }))
                else:
                    click.echo(f"{now.strftime('%H:%M:%S')}  {inst.id}  {describe(inst)}")
                sys.stdout.flush()
                if notify_on and worth_notifying(before, inst):
                    await asyncio.to_thread(notify, inst)
            await asyncio.sleep(interval)


def _check_known(wanted: set[str], listing: schemas.InstanceList) -> None:
    """An id none of the sessions has is a typo (or a session long gone): say so rather than wait for ever."""
    unknown = sorted(wanted - {inst.id for inst in listing.instances})
    if unknown:
        raise CliError(f"no such session: {', '.join(unknown)}", EXIT_NOT_FOUND)


COMMANDS = [watch]
