"""``orz-session``: run inside a session to tell the platform what its agent is doing.

    orz-session state needs-input --message "approve the migration?"
    orz-session state working
    orz-session state idle

The runner installs a wrapper on the session's PATH that passes ``--state-file``; the runner watches that
file and sends the change to the API at once. ``--hook`` reads a Claude Code hook's JSON from stdin and
takes its ``message``. Standard library only: this runs on every hook call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STATES = {"working": "working", "needs-input": "needs_input", "idle": "idle"}
MAX_HOOK_INPUT = 1 << 20


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orz-session", description="Report this session's agent state.")
    parser.add_argument("--state-file", required=True, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    state = sub.add_parser("state", help="set the agent's state: working, needs-input or idle")
    state.add_argument("state", choices=sorted(STATES))
    state.add_argument("-m", "--message", help="what the agent needs (shown with needs-input)")
    state.add_argument("--hook", action="store_true",
                       help="read a Claude Code hook's JSON from stdin and use its message")
    return parser.parse_args(argv)


def hook_message() -> str | None:
    try:
        data = json.loads(sys.stdin.read(MAX_HOOK_INPUT) or "{}")
    except ValueError:
        return None
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) else None


def write_state(path: Path, state: str, message: str | None) -> None:
    """Replace the state file atomically, so the runner never reads half a report."""
    body = json.dumps({"state": state, "message": message, "at": time.time()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    message = args.message
    if args.hook:
        message = hook_message() or message
    try:
        write_state(Path(args.state_file), STATES[args.state], message)
    except OSError as exc:
        print(f"orz-session: could not record the state: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
