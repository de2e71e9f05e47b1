"""tmux behind one module: the pane runs the program, its output time moves, a dead program comes back."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from runner.program import program_argv
from runner.tmux import Tmux
from tests.runner.conftest import wait_for_pane

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]
ENV = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}


async def test_pane_shows_program_output(tmux: Tmux, short_tmp: Path) -> None:
    argv = program_argv("bash -c 'echo hi; sleep infinity'", None, "/bin/bash")
    await tmux.start(argv, cwd=short_tmp, env=ENV)
    await wait_for_pane(tmux, "hi")
    state = await tmux.pane_state()
    assert state.exists and not state.dead and state.clients == 0


async def test_a_program_asking_for_the_task_gets_it_never_as_shell_text(tmux: Tmux, short_tmp: Path) -> None:
    task = "fix it; touch /tmp/should-not-exist-$$ `id`"
    argv = program_argv("bash -c 'printf \"task=%s\\n\" \"$1\"; sleep 30' -- \"$ORZ_TASK\"", task, "/bin/bash")
    await tmux.start(argv, cwd=short_tmp, env={**ENV, "ORZ_TASK": task})
    await wait_for_pane(tmux, "task=fix it; touch")
    assert not list(Path("/tmp").glob("should-not-exist-*"))


async def test_program_exit_is_seen_and_the_program_restarts(tmux: Tmux, short_tmp: Path) -> None:
    argv = program_argv("bash -c 'echo run >> runs.txt; exit 4'", None, "/bin/bash")
    await tmux.start(argv, cwd=short_tmp, env=ENV)
    for _ in range(50):
        state = await tmux.pane_state()
        if state.dead:
            break
        await asyncio.sleep(0.1)
    # The first time the pane reads as dead, its exit status is there too (the runner reports it).
    assert state.dead and state.exit_code == 4
    await tmux.ensure(argv, cwd=short_tmp, env=ENV)
    await asyncio.sleep(0.5)
    assert (short_tmp / "runs.txt").read_text() == "run\nrun\n"
    await tmux.kill_server()
    assert not (await tmux.pane_state()).exists
    await tmux.ensure(argv, cwd=short_tmp, env=ENV)
    assert (await tmux.pane_state()).exists


async def test_output_moves_window_activity_with_nobody_attached(tmux: Tmux, short_tmp: Path) -> None:
    await tmux.start(["bash", "-c", "echo a; sleep 1.2; echo b; sleep infinity"], cwd=short_tmp, env=ENV)
    first = (await tmux.pane_state()).last_output_at
    await wait_for_pane(tmux, "b")
    later = (await tmux.pane_state()).last_output_at
    assert first is not None and later is not None and later > first


def test_program_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runner.program.shutil.which", lambda name: "/usr/bin/claude" if name == "claude" else None)
    # argv[5:]: the command line the user's shell runs, then its arguments (after the exit-note wrapper).
    assert program_argv(None, "fix the bug", "/bin/zsh")[4:] == ["/bin/zsh", 'claude "$@"', "fix the bug"]
    assert program_argv(None, None, "/bin/zsh")[4:] == ["/bin/zsh", "claude"]
    assert program_argv("claude --model opus", "t", "/bin/zsh")[5:] == ['claude --model opus "$@"', "t"]
    assert program_argv("/opt/bin/claude", "t", "/bin/zsh")[5:] == ['/opt/bin/claude "$@"', "t"]
    # Any other program: the task is in $ORZ_TASK and $ORZ_TASK_FILE, never an argument.
    assert program_argv("aider --yes", "the task", "/bin/zsh")[5:] == ["aider --yes"]
    assert program_argv("bash", "say hello", "/bin/zsh")[5:] == ["bash"]
    monkeypatch.setattr("runner.program.shutil.which", lambda name: None)
    [line] = program_argv(None, "t", "/bin/zsh")[5:]
    assert line.endswith("; exec /bin/zsh -l")


async def test_a_stopped_session_comes_back_with_its_scrollback(tmux: Tmux, short_tmp: Path) -> None:
    """Found by the soak: a marker a user left in the pane was gone after the reaper stopped the session
    and ssh woke it (the tmux server, and its history, went with the stop)."""
    argv = program_argv("bash -c 'echo MARK-before-stop; seq 1 300; sleep infinity'", None, "/bin/bash")
    await tmux.start(argv, cwd=short_tmp, env=ENV)
    await wait_for_pane(tmux, "300")  # the marker has scrolled off the screen into the history
    await tmux.kill_server()  # what a stop does
    assert not (await tmux.pane_state()).exists
    await tmux.start(program_argv("bash -c 'echo after-start; sleep infinity'", None, "/bin/bash"),
                     cwd=short_tmp, env=ENV)
    await wait_for_pane(tmux, "after-start")
    history = await tmux.run("capture-pane", "-p", "-S", "-", "-t", "main")
    assert history.index("MARK-before-stop") < history.index("after-start")
    assert not tmux.saved_scrollback.exists()  # shown once: a second start does not repeat it
    pane = await tmux.pane_state()
    cmd = Path(f"/proc/{pane.pane_pid}/cmdline").read_bytes()
    assert b"after-start" in cmd and b"cat --" not in cmd  # the program itself, not the restoring shell


async def test_the_scrollback_survives_a_stop_that_throws_the_state_dir_away(short_tmp: Path) -> None:
    """Found by the soak on Kubernetes: after the reaper stopped a session and ssh woke it, the marker a
    user left in the pane was gone. A stop deletes the Pod, and with it the emptyDir state dir beside
    the tmux socket where the pane's text was kept; the text must wait on the workspace volume instead."""
    workspace = short_tmp / "ws"
    (workspace / ".git").mkdir(parents=True)
    kept = workspace / ".git" / "orz-scrollback.txt"
    before = Tmux(short_tmp / "s1" / "tmux.sock", kept_scrollback=kept)
    before.socket.parent.mkdir()
    try:
        await before.start(program_argv("bash -c 'echo MARK-before-stop; sleep infinity'", None, "/bin/bash"),
                           cwd=workspace, env=ENV)
        await wait_for_pane(before, "MARK-before-stop")
    finally:
        await before.kill_server()  # what the runner does on SIGTERM when the Pod is deleted
    shutil.rmtree(before.socket.parent)  # the emptyDir goes with the Pod
    after = Tmux(short_tmp / "s2" / "tmux.sock", kept_scrollback=kept)  # the woken session's new Pod
    after.socket.parent.mkdir()
    try:
        await after.start(program_argv("bash -c 'echo after-wake; sleep infinity'", None, "/bin/bash"),
                          cwd=workspace, env=ENV)
        await wait_for_pane(after, "after-wake")
        history = await after.run("capture-pane", "-p", "-S", "-", "-t", "main")
        assert history.index("MARK-before-stop") < history.index("after-wake")
        assert not kept.exists()  # shown once, and no file left in the user's repository
    finally:
        await after.kill_server()


async def test_without_a_kept_directory_the_scrollback_stays_beside_the_socket(tmux: Tmux, short_tmp: Path) -> None:
    """A workspace that is not a git repository (no .git yet): the state dir keeps it, as before."""
    tmux.kept_scrollback = short_tmp / "no-repo" / ".git" / "orz-scrollback.txt"
    assert tmux.saved_scrollback == short_tmp / "scrollback.txt"


def _server_answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def test_kill_server_returns_when_the_server_is_gone(tmux: Tmux, short_tmp: Path) -> None:
    """A start right after a stop (ssh waking a session the reaper just stopped) failed with "server exited
    unexpectedly": `tmux kill-server` returns before the server has exited, and the new session's client
    reached the dying server. After kill_server() nothing answers on the socket any more."""
    for _ in range(20):
        await tmux.start(["sleep", "infinity"], cwd=short_tmp, env=ENV)
        await tmux.kill_server()
        assert not _server_answers(tmux.socket)
