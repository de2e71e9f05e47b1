"""A wait on a child process that is cancelled (the runner stopping, a caller's deadline) kills and reaps it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from runner import workspace
from runner.reaping import reaped

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


async def test_a_cancelled_wait_kills_the_process_and_reaps_it() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    task = asyncio.create_task(reaped(proc, proc.wait()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Reaped before the cancellation went on: the exit status is known now, the process is gone.
    assert proc.returncode == -signal.SIGKILL
    assert _gone(proc.pid)


async def test_a_finished_wait_returns_what_the_process_said() -> None:
    proc = await asyncio.create_subprocess_exec("sh", "-c", "echo out; exit 3", stdout=asyncio.subprocess.PIPE)
    out, _ = await reaped(proc, proc.communicate())
    assert out == b"out\n" and proc.returncode == 3


async def test_a_cancelled_init_ends_its_command_and_children_reaped(short_tmp: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[asyncio.subprocess.Process] = []
    spawn = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        made.append(await spawn(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(workspace.asyncio, "create_subprocess_exec", spy)
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
