"""What the session's agent is doing: working, needs_input (with a message), idle, or exited (with a code).

Three sources, strongest first:

- the pane's program exited: ``exited`` with its exit code;
- a report written by ``orz-session state ...`` (runner/session_cli.py) to the state file, by any script
  or by the Claude Code hooks this module installs in the session's ``~/.claude/settings.json``;
- for programs that report nothing: the detector. No pane output for ``needs_input_after_s`` while the
  pane's foreground process sleeps reading its terminal -> ``needs_input``; output -> ``working``.
  A login shell waiting at its prompt is ``idle``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from api.schemas import AGENT_MESSAGE_MAX, AgentState, scrub_controls

log = logging.getLogger(__name__)

STATE_FILE = "agent-state.json"
HELPER = "orz-session"
HOOK_MARK = HELPER  # our entries in ~/.claude/settings.json are the hooks whose command runs orz-session
# Claude Code events -> the `orz-session state` arguments their hook runs (the hook's JSON comes on stdin).
CLAUDE_HOOKS = {
    "Notification": "state needs-input --hook",
    "Stop": "state idle --hook",
    "UserPromptSubmit": "state working --hook",
}
# Kernel wait channels of a task sleeping in read(2) on a terminal (older kernels: n_tty_read).
_TTY_WAITS = frozenset({"n_tty_read", "wait_woken"})
# Sleeping in poll(2)/select(2), as readline and many prompts do before they read: a wait for the terminal
# only when the process has no socket open (a quiet server polls its sockets, and is not asking anything).
_POLL_WAITS = frozenset({"poll_schedule_timeout", "poll_schedule_timeout.constprop.0", "do_select",
                         "do_sys_poll", "core_sys_select"})
_SHELLS = frozenset({"bash", "sh", "dash", "zsh", "fish", "ksh"})


@dataclass(frozen=True)
class AgentReport:
    state: AgentState | None
    message: str | None = None
    exit_code: int | None = None


def clean_message(text: object) -> str | None:
    """One line of at most AGENT_MESSAGE_MAX characters (the API refuses control characters there)."""
    if not isinstance(text, str) or not text.strip():
        return None
    line = " ".join(text.split())  # newlines and tabs become single spaces
    return scrub_controls(line, "line")[:AGENT_MESSAGE_MAX] or None


def title_label(report: AgentReport) -> str:
    """The agent's state as the terminal title shows it (tmux's set-titles-string reads @orz_agent)."""
    if report.state == "exited":
        return f"exited {report.exit_code}" if report.exit_code is not None else "exited"
    return (report.state or "").replace("_", " ")


def title_format(session_id: str) -> str:
    """tmux set-titles-string: ``[needs input] <id> · Orzbob Cloud`` (ssh terminals and the browser page)."""
    return f"#{{?@orz_agent,[#{{@orz_agent}}] ,}}{session_id} · Orzbob Cloud"


def read_report(path: Path) -> AgentReport | None:
    """The last report ``orz-session state`` wrote; None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    state = data.get("state") if isinstance(data, dict) else None
    if state not in ("working", "needs_input", "idle"):
        return None
    return AgentReport(state, clean_message(data.get("message")))


# ------------------------------------------------------------------------------------------ detector


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on; the command name may hold spaces."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def foreground_pid(pane_pid: int) -> int | None:
    """The process group leader in the foreground of the pane's terminal (tpgid of its first process)."""
    fields = _stat_fields(pane_pid)
    if fields is None or len(fields) < 6:
        return None
    tpgid = int(fields[5])
    return tpgid if tpgid > 0 else None


def process_group(pgid: int) -> list[int]:
    """Every process of a process group (one pass over /proc; the detector runs only after a quiet spell)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and len(fields) > 2 and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def reading_tty(pid: int) -> bool:
    """Whether the process sleeps in a read of its terminal (cheap: two small /proc reads)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] != "S":
        return False
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        wchan = ""
    if wchan in _TTY_WAITS:
        return True
    if wchan in _POLL_WAITS:
        return not _has_sockets(pid)
    if wchan and wchan != "0":
        return False  # sleeping on something else (a child, a socket, a timer)
    with contextlib.suppress(OSError, IndexError):  # wchan hidden: syscall 0 is read(2) on x86-64
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "0"
    return False  # cannot tell: better no alarm than a false one


def _has_sockets(pid: int) -> bool:
    """Whether the process has a socket open (True when its fds cannot be read: no alarm then)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in fds)
    except OSError:
        return True


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "the program"


@dataclass
class Detector:
    """needs_input for programs that report nothing, from the pane's output time and its foreground process."""

    after_s: float
    login_shell: bool  # the session's program is a login shell: its prompt means idle, not a question

    def judge(self, pane_pid: int | None, last_output_at: datetime | None,
              now: datetime | None = None) -> AgentReport:
        now = now or datetime.now(UTC)
        quiet_s = (now - last_output_at).total_seconds() if last_output_at else 0.0
        if pane_pid is None or quiet_s < self.after_s:
            return AgentReport("working")
        fg = foreground_pid(pane_pid)
        if fg is None:
            return AgentReport("working")
        # The program runs under a wrapper (runner/program.py) in the same process group unless it made its
        # own: whoever of the foreground group sleeps reading the terminal is the one waiting.
        readers = [pid for pid in process_group(fg) if reading_tty(pid)]
        if not readers:
            return AgentReport("working")
        reader = max(readers)  # the most recently started: the innermost command
        name = process_name(reader)
        if self.login_shell and name in _SHELLS and pane_pid in (reader, parent_pid(reader)):
            # The session's shell (the pane's process, or its child under the program wrapper) with no job
            # in the foreground: at its prompt.
            return AgentReport("idle")
        # The message stays the same while the wait goes on: a changed message is a new event.
        return AgentReport("needs_input", f"{name} is waiting for input (no output for {self.after_s:g} s)")


# ------------------------------------------------------------------------------- helper and hooks


def install_helper(state_dir: Path) -> Path:
    """Write ``<state_dir>/bin/orz-session`` (a wrapper around runner.session_cli); returns its directory."""
    bindir = state_dir / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent  # the directory holding the runner package
    script = (
        "#!/bin/sh\n"
        f"# Installed by the orz runner: report the agent's state (orz-session state --help).\n"
        f"PYTHONPATH={shlex.quote(str(root))} exec {shlex.quote(sys.executable)} -P -m runner.session_cli "
        f"--state-file {shlex.quote(str(state_dir / STATE_FILE))} \"$@\"\n"
    )
    helper = bindir / HELPER
    tmp = helper.with_suffix(".tmp")
    tmp.write_text(script, encoding="utf-8")
    tmp.chmod(0o755)
    tmp.replace(helper)
    return bindir


def merge_claude_hooks(settings: dict[str, object], helper: str) -> dict[str, object]:
    """``settings`` with our hooks for the three events, every hook of the user's kept as it is.

    Ours are recognised by their command running orz-session: an older entry of ours is replaced (the
    helper may have moved), anything else is left in place and ours is added beside it.
    """
    hooks = settings.get("hooks", {})
    if not isinstance(hooks, dict):
        return settings  # not the documented shape: the user's to fix, not ours to overwrite
    merged: dict[str, object] = {**settings, "hooks": dict(hooks)}
    for event, args in CLAUDE_HOOKS.items():
        entries = hooks.get(event, [])
        if not isinstance(entries, list):
            continue
        kept = [e for e in entries if not _ours(e)]
        kept.append({"hooks": [{"type": "command", "command": f"{shlex.quote(helper)} {args}", "timeout": 10}]})
        merged["hooks"][event] = kept  # type: ignore[index]
    return merged


def _ours(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("hooks"), list):
        return False
    commands = [h.get("command") for h in entry["hooks"] if isinstance(h, dict)]
    return bool(commands) and all(isinstance(c, str) and HOOK_MARK in c for c in commands)


def install_claude_hooks(home: Path, helper: Path) -> bool:
    """Merge our hooks into ``~/.claude/settings.json``; a file that is not a JSON object is left alone."""
    path = home / ".claude" / "settings.json"
    settings: object = {}
    if path.exists():
        try:
            settings = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError) as exc:
            log.warning("not adding Claude Code hooks: %s is not readable JSON (%s)", path, exc)
            return False
        if not isinstance(settings, dict):
            log.warning("not adding Claude Code hooks: %s is not a JSON object", path)
            return False
    merged = merge_claude_hooks(settings, str(helper))
    if merged == settings:
        return True
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".settings.json.orz-{os.getpid()}")
        tmp.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
        with contextlib.suppress(OSError):
            tmp.chmod(path.stat().st_mode & 0o777 if path.exists() else 0o600)
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not add Claude Code hooks to %s: %s", path, exc)
        return False
    return True
