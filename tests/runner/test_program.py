"""How the task reaches the session's program, and what the pane says when the program exits (real tmux)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from runner.program import describe_exit, program_argv, runs_login_shell, task_env
from runner.tmux import Tmux
from tests.runner.conftest import MakeRepo, StartRunner, wait_for_pane
from tests.runner.fake_api import FakeApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]
ENV = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8", "ORZ_SESSION_ID": "demo-1",
       "PS1": "$ "}


async def dead_state(tmux: Tmux) -> int | None:
    for _ in range(50):
        state = await tmux.pane_state()
        if state.dead:
            return state.exit_code
        await asyncio.sleep(0.1)
    raise AssertionError("the program did not exit")


async def test_bash_with_a_task_is_an_interactive_shell_holding_the_task(tmux: Tmux, short_tmp: Path) -> None:
    # `orz cloud new --program bash "say hello"`: bash starts (not `bash "say hello"`, exit 127) and the
    # task is in $ORZ_TASK and the file $ORZ_TASK_FILE.
    env = {**ENV, **task_env("say hello", short_tmp / "state")}
    await tmux.start(program_argv("bash --norc", "say hello", "/bin/bash"), cwd=short_tmp, env=env)
    await asyncio.sleep(0.5)
    assert not (await tmux.pane_state()).dead
    await tmux.run("send-keys", "-t", "main", 'echo "task=[$ORZ_TASK]"; cat "$ORZ_TASK_FILE"; echo END', "Enter")
    screen = await wait_for_pane(tmux, "\nEND")
    assert "task=[say hello]\nsay hello\n" in screen  # the variable, then the file
    assert oct((short_tmp / "state" / "task.txt").stat().st_mode & 0o777) == "0o600"
    await tmux.run("send-keys", "-t", "main", "exit 3", "Enter")
    assert await dead_state(tmux) == 3  # the program's own status, through the wrapper
    screen = await wait_for_pane(tmux, "[orz] the program exited with code 3")
    assert "[orz] attaching again restarts it (Ctrl-b d, then orz cloud attach demo-1)" in screen


async def test_without_claude_the_pane_says_it_runs_a_shell_and_where_the_task_is(
        tmux: Tmux, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `make dev` on a machine without claude, `orz cloud new "fix the flaky test"`: the user lands at a shell
    # prompt, and the pane says why instead of leaving them to guess what became of their task.
    monkeypatch.setattr("runner.program.shutil.which", lambda name: None)
    env = {**ENV, **task_env("fix the flaky test", short_tmp / "state")}
    await tmux.start(program_argv(None, "fix the flaky test", "/bin/bash"), cwd=short_tmp, env=env, width=250)
    await wait_for_pane(tmux, "[orz] claude is not installed on this server, so this session runs a shell (the task "
                              "is in $ORZ_TASK); start a session with --program CMD to run another agent")
    await tmux.run("send-keys", "-t", "main", 'echo "task=[$ORZ_TASK]"', "Enter")
    await wait_for_pane(tmux, "task=[fix the flaky test]")
    assert runs_login_shell(None, "fix the flaky test", "/bin/bash")  # its prompt is idle, not a question


async def test_a_program_that_does_not_exist_says_so_in_the_pane(tmux: Tmux, short_tmp: Path) -> None:
    await tmux.start(program_argv("no-such-agent --go", "t", "/bin/bash"), cwd=short_tmp, env=ENV)
    assert await dead_state(tmux) == 127
    screen = await wait_for_pane(tmux, "[orz] the program exited with code 127 (command not found; check --program)")
    assert "no-such-agent --go" in screen


async def test_a_program_killed_by_a_signal_names_it(tmux: Tmux, short_tmp: Path) -> None:
    await tmux.start(program_argv("kill -TERM $$", None, "/bin/bash"), cwd=short_tmp, env=ENV)
    assert await dead_state(tmux) == 143
    await wait_for_pane(tmux, "(killed by signal TERM)")
    assert describe_exit(143) == "exited with code 143 (killed by signal TERM)"


async def test_claude_gets_the_task_as_its_prompt(tmux: Tmux, short_tmp: Path) -> None:
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "claude"
    fake.write_text('#!/bin/sh\nprintf "prompt=[%s] argc=%s\\n" "$1" "$#"\nsleep 30\n')
    fake.chmod(0o755)
    task = "fix it; `id` $HOME"
    await tmux.start(program_argv(f"{fake} --verbose", task, "/bin/bash"), cwd=short_tmp,
                     env={**ENV, **task_env(task, short_tmp / "state")})
    await wait_for_pane(tmux, "prompt=[--verbose]")  # its own flags first, then the task
    other = Tmux(short_tmp / "other.sock")
    try:
        await other.start(program_argv(str(fake), task, "/bin/bash"), cwd=short_tmp, env=ENV)
        await wait_for_pane(other, "prompt=[fix it; `id` $HOME] argc=1")
    finally:
        await other.kill_server()


async def test_the_runner_reports_an_exit_at_once_and_a_restart(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    # A long heartbeat interval: the exit must still reach the API within a second or two (tmux's hook).
    fake_api.interval_s = 60
    handle = await start_runner(None, program="sleep 1; exit 127", task="say hello", heartbeat_interval_s=60)
    await handle.ready()
    exited = await fake_api.wait_for(lambda b: b.get("program_events"), timeout=5)
    [event] = exited["program_events"]
    assert event["kind"] == "program_exited" and event["exit_code"] == 127
    assert event["message"] == "the program exited with code 127 (command not found; check --program)"
    assert (await handle.runner.tmux.pane_state()).dead
    # Attaching restarts it: reported once as well.
    await handle.runner._ensure_program()
    restarted = await fake_api.wait_for(
        lambda b: any(e["kind"] == "program_restarted" for e in b.get("program_events") or []), timeout=5)
    assert restarted["program_running"] is True
    await fake_api.wait_for(lambda b: b.get("program_events") and b is not exited
                            and b["program_events"][-1]["kind"] == "program_exited", timeout=8)
    kinds = [e["kind"] for b in fake_api.bodies() for e in b.get("program_events") or []]
    assert kinds == ["program_exited", "program_restarted", "program_exited"]  # each sent once


async def test_ctrl_c_reaches_the_program_not_the_pane(tmux: Tmux, short_tmp: Path) -> None:
    # A program that handles Ctrl-C (claude does) keeps running in its pane...
    program = "bash -c 'trap \"echo got-int\" INT; while :; do sleep 0.1; done'"
    await tmux.start(program_argv(program, None, "/bin/bash"), cwd=short_tmp, env=ENV)
    await asyncio.sleep(0.5)
    await tmux.run("send-keys", "-t", "main", "C-c")
    await wait_for_pane(tmux, "got-int")
    assert not (await tmux.pane_state()).dead
    # ...and one that does not is ended by it, with the reason in the pane.
    await tmux.kill_server()
    other = Tmux(short_tmp / "other.sock")
    try:
        await other.start(program_argv("sleep 30", None, "/bin/bash"), cwd=short_tmp, env=ENV)
        await asyncio.sleep(0.5)
        await other.run("send-keys", "-t", "main", "C-c")
        assert await dead_state(other) == 130
        await wait_for_pane(other, "exited with code 130 (killed by signal INT)")
    finally:
        await other.kill_server()


async def test_attached_clients_reach_the_api_at_once(start_runner: StartRunner, fake_api: FakeApi) -> None:
    fake_api.interval_s = 60  # no periodic heartbeat would carry it within this test
    handle = await start_runner(None, heartbeat_interval_s=60)
    await handle.ready()
    conn = await handle.connect()
    await fake_api.wait_for(lambda b: b.get("attached_clients") == 1, timeout=3)
    conn.close()
    await conn.wait_closed()
    for _ in range(30):
        if fake_api.bodies()[-1].get("attached_clients", 0) == 0:
            break
        await asyncio.sleep(0.1)
    assert fake_api.bodies()[-1].get("attached_clients", 0) == 0
