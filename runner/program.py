"""How the session's program is run, how the task reaches it, and what the pane says when it exits.

The task reaches the program in one of two ways, never as shell text:

* claude (the default program, or a ``--program`` whose command is ``claude``) gets it as its prompt
  argument: ``claude "<task>"``.
* Any other program gets it in the environment, ``ORZ_TASK``, and in a file, ``ORZ_TASK_FILE``; it is
  not put on the command line, so ``--program bash "say hello"`` starts an interactive bash instead of
  running a script called "say hello". A program that wants it as an argument asks for it in its command:
  ``--program 'aider --message "$ORZ_TASK"'``.

The program runs under a small POSIX sh wrapper (run by bash where there is one: see passing_shell) that,
when the program exits, prints why in the pane (the pane stays, tmux's remain-on-exit) and exits with the
program's own status, so the runner reads the same exit code from tmux and reports it to the API
(``orz cloud status``).
"""

from __future__ import annotations

import shlex
import shutil
import signal
from pathlib import Path

from runner.tmux import PANE_DIED, passing_shell

TASK_ENV = "ORZ_TASK"
TASK_FILE_ENV = "ORZ_TASK_FILE"
TASK_FILE = "task.txt"
CLAUDE = "claude"
# $0 of the program's shell: what `ps` shows for the wrapped program.
ARGV0 = "orz-program"

# Exit statuses with a known meaning (POSIX shells, and 128+N for a program killed by signal N).
EXIT_REASONS: dict[int, str] = {
    0: "it finished",
    126: "the command is not executable",
    127: "command not found; check --program",
}

# The pane's terminal stays open this long after the note: Linux may drop what a program wrote just before
# its terminal closed, before tmux read it (seen with a program that fails at once: an empty dead pane).
LINGER_S = 0.5

# `trap :` (not `trap ''`): the wrapper outlives a Ctrl-C meant for the program, while the program, whose
# handlers exec resets, still gets Ctrl-C as usual.
_WRAPPER = """\
trap : INT QUIT
shell=$1; line=$2; shift 2
"$shell" -c "$line" {argv0} "$@"
code=$?
case $code in
{cases}
  *) if [ "$code" -gt 128 ]; then why="killed by signal $(kill -l $((code - 128)) 2>/dev/null || echo $((code - 128)))"
     else why="it failed"; fi ;;
esac
printf '\\n[orz] the program exited with code %s (%s): %s\\n' "$code" "$why" "$line"
printf '[orz] attaching again restarts it (Ctrl-b d, then orz cloud attach %s)\\n' "$ORZ_SESSION_ID"
sleep {linger}
# tmux 3.3 sometimes does not notice its child's exit until another of its children exits (then the
# pane-died hook the runner waits for never fires): a moment after this exit, wake the runner ourselves.
( sleep 0.2; tmux wait-for -S {channel} ) </dev/null >/dev/null 2>&1 &
exit "$code"
"""


def _wrapper() -> str:
    cases = "\n".join(f"  {code}) why={shlex.quote(text)} ;;" for code, text in EXIT_REASONS.items())
    return _WRAPPER.format(argv0=ARGV0, cases=cases, linger=LINGER_S, channel=PANE_DIED)


def describe_exit(code: int | None) -> str:
    """The same words the pane shows, for the API's event: "exited with code 127 (command not found ...)"."""
    if code is None:
        return "exited"
    if code in EXIT_REASONS:
        why = EXIT_REASONS[code]
    elif code > 128:
        try:
            why = f"killed by signal {signal.Signals(code - 128).name.removeprefix('SIG')}"
        except ValueError:
            why = f"killed by signal {code - 128}"
    else:
        why = "it failed"
    return f"exited with code {code} ({why})"


def is_claude(program: str | None) -> bool:
    """Whether the command runs claude (then the task is its prompt argument)."""
    if not program:
        return False
    try:
        words = shlex.split(program)
    except ValueError:
        return False
    return bool(words) and Path(words[0]).name == CLAUDE


def command_line(program: str | None, task: str | None, shell: str) -> tuple[str, list[str]]:
    """The shell line the session runs and its positional arguments (the task, for claude only)."""
    if program:
        if task and is_claude(program):
            return f'{program} "$@"', [task]
        return program, []
    if shutil.which(CLAUDE):
        return (f'{CLAUDE} "$@"', [task]) if task else (CLAUDE, [])
    # No agent here (a `make dev` machine without claude): a shell, and the pane says why before its prompt.
    return f"printf '%s\\n' {shlex.quote(_no_claude_note(task))}; {_login_shell(shell)}", []


def _login_shell(shell: str) -> str:
    return f"exec {shlex.quote(shell)} -l"


def _no_claude_note(task: str | None) -> str:
    where = " (the task is in $ORZ_TASK)" if task else ""
    return (f"[orz] claude is not installed on this server, so this session runs a shell{where}; "
            "start a session with --program CMD to run another agent")


def runs_login_shell(program: str | None, task: str | None, shell: str) -> bool:
    """The session's program is the user's login shell (its prompt means idle, not a question)."""
    return command_line(program, task, shell)[0].endswith(f"; {_login_shell(shell)}")


def program_argv(program: str | None, task: str | None, shell: str) -> list[str]:
    """What tmux runs: the requested program, else claude when installed, else a login shell.

    ``shell`` (the user's login shell) runs the command line; the wrapper around it is bash (else /bin/sh).
    """
    line, args = command_line(program, task, shell)
    return [passing_shell(), "-c", _wrapper(), ARGV0, shell, line, *args]


def task_env(task: str | None, state_dir: Path) -> dict[str, str]:
    """ORZ_TASK and ORZ_TASK_FILE for a session with a task (the file is written here, mode 0600)."""
    if not task:
        return {}
    path = state_dir / TASK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(task if task.endswith("\n") else task + "\n", encoding="utf-8")
    return {TASK_ENV: task, TASK_FILE_ENV: str(path)}
