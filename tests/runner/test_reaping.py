"""The runner's children on either event loop: a cancelled wait (the runner stopping, a caller's deadline) kills
and reaps them, and they get what the standard library gives a child (closed descriptors, a terminal, pipes)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from runner import workspace
from runner.ptyproc import PtyChild
from runner.reaping import missing_internals, reaped, spawn
from runner.tmux import Tmux
from tests.runner.conftest import wait_for_pane

EVERY_LOOP = True  # each test on asyncio's own loop and on uvloop (tests/runner/conftest.py)
pytestmark = [pytest.mark.timeout(20)]
ENV = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}


async def _until(path: Path) -> str:
    for _ in range(200):
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never written")


def _gone(pid: int) -> bool:
    """No process, not even a zombie, with this pid."""
    return not Path(f"/proc/{pid}").exists()


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever reaps orphans here."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_the_installed_python_keeps_the_asyncio_internals_spawn_needs() -> None:
    # Without them spawn falls back to the loop's own subprocesses, which on uvloop hang on a daemon
    # (tmux new-session) and cannot give a pty its controlling terminal: name what is gone.
    assert missing_internals() == []


async def test_a_cancelled_wait_kills_the_process_and_reaps_it() -> None:
    proc = await spawn("sleep", "30")
    task = asyncio.create_task(reaped(proc, proc.wait()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Reaped before the cancellation went on: the exit status is known now, the process is gone.
    assert proc.returncode == -signal.SIGKILL
    assert _gone(proc.pid)


async def test_a_finished_wait_returns_what_the_process_said() -> None:
    proc = await spawn("sh", "-c", "echo out; exit 3", stdout=asyncio.subprocess.PIPE)
    out, _ = await reaped(proc, proc.communicate())
    assert out == b"out\n" and proc.returncode == 3


async def test_a_cancelled_init_ends_its_command_and_children_reaped(short_tmp: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[asyncio.subprocess.Process] = []

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        made.append(await spawn(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(workspace, "spawn", spy)
    ws = short_tmp / "ws"
    ws.mkdir()
    init = asyncio.create_task(workspace.run_init("sleep 30 & echo $! > child; wait", ws, short_tmp / "init.log",
                                                  env=ENV))
    child = int(await _until(ws / "child"))
    init.cancel()
    with pytest.raises(asyncio.CancelledError):
        await init
    assert made and made[0].returncode == -signal.SIGKILL  # the init shell, reaped
    for _ in range(100):  # its background child, killed with the group (init, not we, reaps it)
        if _dead(child):
            break
        await asyncio.sleep(0.05)
    assert _dead(child)
    assert not workspace.init_done(ws)


async def test_a_daemon_started_by_a_command_does_not_hold_its_output_open(short_tmp: Path) -> None:
    # tmux new-session -d leaves its server running in the background with its stdio on /dev/null; on
    # uvloop's own subprocesses the server also kept a copy of the runner's pipe and the start never returned.
    tmux = Tmux(short_tmp / "tmux.sock")
    try:
        await asyncio.wait_for(tmux.start(["sh", "-c", "echo started-here; exec sleep 60"], cwd=short_tmp, env=ENV),
                               10)
        await wait_for_pane(tmux, "started-here")
    finally:
        await tmux.kill_server()
    proc = await spawn("sh", "-c", "sleep 30 </dev/null >/dev/null 2>&1 & echo $!", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    os.kill(int(out), signal.SIGKILL)


async def test_a_pty_program_has_its_terminal_and_a_piped_one_its_pipes(short_tmp: Path) -> None:
    seen = bytearray()
    child = await PtyChild.spawn(["sh", "-c", "exec 3</dev/tty && echo has-a-terminal"], cwd=short_tmp, env=ENV,
                                 cols=80, rows=24, on_output=seen.extend)
    assert await child.wait(10) == 0
    assert b"has-a-terminal" in seen  # /dev/tty opens only for a process with a controlling terminal
    # ``ssh host 'tool /dev/stdin'``: a socket (uvloop's pipes) cannot be opened as /dev/stdin.
    proc = await spawn("cat", "/dev/stdin", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                       stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"through a pipe"), 10)
    assert (out, err, proc.returncode) == (b"through a pipe", b"", 0)
