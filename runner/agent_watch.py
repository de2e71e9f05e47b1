"""The runner's watch on the session: the agent's state (runner/agent.py) and the workspace's git state
(runner/work.py), each change put in the heartbeat at once (Activity.poke)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

from api.schemas import WorkState
from runner import agent, work
from runner.activity import Activity
from runner.tmux import Tmux

log = logging.getLogger(__name__)

FILE_POLL_S = 0.5  # how often the state file orz-session writes is looked at (one stat)
PANE_POLL_S = 2.0  # how often the detector looks at the pane (one tmux call, a few /proc reads)
# A connection's end asks for a scan (Activity.rescan_work); many short ones (scp -r, a CI loop) get at most
# one `git status` per this many seconds.
MIN_RESCAN_S = 1.0


class AgentWatch:
    def __init__(self, *, tmux: Tmux, activity: Activity, state_file: Path, detector: agent.Detector,
                 workspace: Path, env: Mapping[str, str], work_scan_s: float) -> None:
        self.tmux = tmux
        self.activity = activity
        self.state_file = state_file
        self.detector = detector
        self.workspace = workspace
        self.env = env
        self.work_scan_s = work_scan_s
        self._pane_was_dead = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="agent-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_mtime: float | None = None
        next_pane = next_scan = 0.0
        last_scan = -MIN_RESCAN_S
        while True:
            try:
                now = loop.time()
                try:
                    mtime: float | None = self.state_file.stat().st_mtime
                except OSError:
                    mtime = None
                if mtime != last_mtime or now >= next_pane:
                    last_mtime, next_pane = mtime, now + PANE_POLL_S
                    await self.observe_agent()
                rescan = self.activity.rescan_work.is_set() and now >= last_scan + MIN_RESCAN_S
                if now >= next_scan or rescan:
                    self.activity.rescan_work.clear()
                    last_scan, next_scan = now, now + self.work_scan_s
                    await self.scan_work()
            except Exception:
                log.exception("could not read the agent's or the workspace's state")
            await asyncio.sleep(FILE_POLL_S)

    async def observe_agent(self) -> None:
        pane = await self.tmux.pane_state()
        if not pane.exists:
            return
        if pane.dead:
            self._pane_was_dead = True
            report = agent.AgentReport("exited", None, pane.exit_code)
        else:
            if self._pane_was_dead:  # the program started again: what the last run reported is stale
                self._pane_was_dead = False
                self.state_file.unlink(missing_ok=True)
            report = agent.read_report(self.state_file) or self.detector.judge(pane.pane_pid, pane.last_output_at)
        current = (self.activity.agent_state, self.activity.agent_message, self.activity.agent_exit_code)
        if (report.state, report.message, report.exit_code) == current:
            return
        log.info("agent state: %s%s", report.state, f" ({report.message})" if report.message else "")
        self.activity.agent_state = report.state
        self.activity.agent_message = report.message
        self.activity.agent_exit_code = report.exit_code
        self.activity.poke()
        await self.tmux.run("set-option", "-g", "@orz_agent", agent.title_label(report), check=False)

    async def scan_work(self) -> None:
        scanned = await work.scan(self.workspace, self.env)
        if scanned is not None and _work_changed(self.activity.work, scanned):
            self.activity.work = scanned
            self.activity.poke()


def _work_changed(old: WorkState | None, new: WorkState) -> bool:
    return old is None or (old.dirty_files, old.unpushed_commits, old.files) != (
        new.dirty_files, new.unpushed_commits, new.files)
