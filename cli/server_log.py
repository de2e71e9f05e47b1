"""`orz server`'s two audiences: every log line (JSON) goes to a file in the data dir; the terminal gets one
human line per event (a session changing state, a warning or an error), so the banner stays readable."""

from __future__ import annotations

import logging
import os
import stat
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from api import log as orz_log
from api.schemas import scrub_controls
from api.settings import Settings

# Human events for the terminal of `orz server` (and, like everything, the log file).
EVENTS = logging.getLogger("orz.events")
LOG_FILE = Path("logs") / "server.log"


def log_path(settings: Settings) -> Path:
    return settings.data_dir / LOG_FILE


# Log records the services mark with one of these `event`s are worth a line on the terminal too.
TERMINAL_EVENTS = frozenset({"attached", "detached", "revoked", "program"})


class TerminalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "event", None)
        if event == "access":
            return False  # access lines are for the file (and a 5xx is logged again as an error)
        return record.name == EVENTS.name or event in TERMINAL_EVENTS or record.levelno >= logging.WARNING


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        # Lines quote what sessions report (a runner's failure reason, a program event), from any org: their
        # escape sequences must not drive the operator's terminal (shown as U+FFFD; the file keeps them).
        return f"{at}  {level}{scrub_controls(orz_log.redact(record.getMessage()), 'text')}"


def configure(settings: Settings, terminal: TextIO | None = None) -> Path:
    """JSON lines at the configured level to <data dir>/logs/server.log; events and warnings to the terminal."""
    path = log_path(settings)
    # The data dir first, 0700: `mkdir -p` of the log's directory would make it 0755 (umask), its database
    # and sessions' directory listable by every account on the machine.
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    orz_log.configure(settings.log_level, json_lines=True, stream=_open_log(path))
    screen = logging.StreamHandler(terminal or sys.stderr)
    screen.setFormatter(_HumanFormatter())
    screen.addFilter(TerminalFilter())
    logging.getLogger().addHandler(screen)
    EVENTS.setLevel(logging.INFO)  # shown whatever ORZ_LOG_LEVEL says
    private_data_dir(settings.data_dir)
    return path


def private_data_dir(data_dir: Path) -> None:
    """An existing data dir (an earlier version's, or one made by hand) is made 0700 too when this user
    owns it; one someone else owns is not ours to change: a warning says it stays as it is."""
    info = data_dir.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    if info.st_uid != os.geteuid():
        logging.getLogger(__name__).warning(
            "the data dir %s is mode %04o and owned by uid %d, not this server's user: it is left as it is, "
            "and other accounts on this machine may list it; make it 0700", data_dir, mode, info.st_uid)
        return
    data_dir.chmod(mode & 0o700)


def _open_log(path: Path) -> TextIO:
    path.touch(mode=0o600, exist_ok=True)
    return path.open("a", encoding="utf-8", buffering=1)


def session_event(row: Any, current: Any, target: Any) -> None:
    """on_transition listener: `session <id>: starting -> running` (with the reason when there is one)."""
    reason = f" ({row.reason})" if getattr(row, "reason", None) else ""
    EVENTS.info("session %s: %s -> %s%s", row.id, getattr(current, "value", current),
                getattr(target, "value", target), reason)
