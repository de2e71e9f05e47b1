"""Agent state (orz-session, Claude Code hooks, the needs_input detector) and the WIP push, with the whole
runner in-process: real tmux, real git with a bare origin, the fake heartbeat API."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from runner import agent
from runner.program import runs_login_shell
from tests.runner.conftest import MakeRepo, StartRunner, git
from tests.runner.fake_api import FakeApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]


async def test_orz_session_on_the_path_reports_needs_input_with_its_message(
        start_runner: StartRunner, fake_api: FakeApi) -> None:
    program = ("bash -c 'orz-session state needs-input --message \"approve the migration?\"; read x; "
               "orz-session state working; sleep infinity'")
    handle = await start_runner(None, program=program)
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "needs_input", timeout=10)
    assert body["agent_message"] == "approve the migration?"
    # Attached terminals get it in their title (tmux set-titles; the browser page follows the title).
    tmux = handle.runner.tmux
    title_format = (await tmux.run("show-options", "-gv", "set-titles-string")).strip()
    assert (await tmux.run("display-message", "-p", "-t", "main", title_format)).strip() == \
        "[needs input] s1 · Orzbob Cloud"
    before = len(fake_api.bodies())
    await handle.runner.tmux.run("send-keys", "-t", "main", "yes", "Enter")
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "working"
                                   and b in fake_api.bodies()[before:], timeout=10)
    assert body.get("agent_message") is None


async def test_detector_flags_a_program_blocked_on_read_and_clears_on_output(
        start_runner: StartRunner, fake_api: FakeApi) -> None:
    program = "bash -c 'echo what is your name; read name; echo hello $name; sleep infinity'"
    handle = await start_runner(None, program=program, needs_input_after_s=1.5)
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "needs_input", timeout=15)
    assert body["agent_message"] == "bash is waiting for input (no output for 1.5 s)"
    await asyncio.sleep(3)  # still waiting: the same state, no new message (which would be a new event)
    assert {b.get("agent_message") for b in fake_api.bodies() if b.get("agent_state") == "needs_input"} == {
        body["agent_message"]}
    before = len(fake_api.bodies())
    await handle.runner.tmux.run("send-keys", "-t", "main", "ada", "Enter")
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "working"
                                   and b in fake_api.bodies()[before:], timeout=10)
    # Sleeping (not reading the terminal) after the answer: it stays working however long it is quiet.
    await asyncio.sleep(3)
    assert handle.runner.activity.agent_state == "working"


async def test_a_program_that_exits_is_reported_exited_with_its_code(
        start_runner: StartRunner, fake_api: FakeApi) -> None:
    await start_runner(None, program="bash -c 'echo bye; exit 3'")
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "exited", timeout=10)
    assert body["agent_exit_code"] == 3


async def test_claude_hooks_are_merged_into_the_users_settings_and_report(
        start_runner: StartRunner, fake_api: FakeApi, short_tmp: Path) -> None:
    settings = short_tmp / ".claude" / "settings.json"
    settings.parent.mkdir()
    mine = {"model": "opus", "hooks": {"Stop": [{"hooks": [{"type": "command", "command": "say done"}]}],
                                       "PreToolUse": [{"matcher": "Bash", "hooks": [
                                           {"type": "command", "command": "audit.sh"}]}]}}
    settings.write_text(json.dumps(mine))
    handle = await start_runner(None)
    await handle.ready()
    merged = json.loads(settings.read_text())
    assert merged["model"] == "opus"
    assert merged["hooks"]["PreToolUse"] == mine["hooks"]["PreToolUse"]
    assert merged["hooks"]["Stop"][0] == mine["hooks"]["Stop"][0] and len(merged["hooks"]["Stop"]) == 2
    # A second start does not add our hooks twice.
    assert agent.merge_claude_hooks(merged, str(handle.runner.state_dir / "bin" / "orz-session")) == merged

    # Run the Notification hook as Claude Code does: its JSON on stdin.
    command = merged["hooks"]["Notification"][0]["hooks"][0]["command"]
    hook_input = json.dumps({"hook_event_name": "Notification", "message": "Claude needs your permission to use Bash"})
    done = subprocess.run(["bash", "-c", command], input=hook_input, text=True, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "needs_input", timeout=10)
    assert body["agent_message"] == "Claude needs your permission to use Bash"
    stop_command = merged["hooks"]["Stop"][1]["hooks"][0]["command"]
    subprocess.run(["bash", "-c", stop_command], input="{}", text=True, check=True)
    await fake_api.wait_for(lambda b: b.get("agent_state") == "idle", timeout=10)


async def test_settings_that_are_not_json_are_left_alone(start_runner: StartRunner, short_tmp: Path) -> None:
    settings = short_tmp / ".claude" / "settings.json"
    settings.parent.mkdir()
    settings.write_text("{ not json")
    handle = await start_runner(None)
    await handle.ready()
    assert settings.read_text() == "{ not json"


def _bare_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


async def test_stop_pushes_uncommitted_and_unpushed_work_to_the_wip_branch(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    url = make_repo({"app.py": "print(1)\n"})
    program = ("bash -c 'git -c user.name=a -c user.email=a@b commit -q --allow-empty -m local-only; "
               "echo changed > app.py; echo new > notes.txt; sleep infinity'")
    handle = await start_runner(url, program=program, work_scan_s=0.5)
    body = await fake_api.wait_for(lambda b: (b.get("work") or {}).get("dirty_files") == 2, timeout=15)
    assert body["work"]["unpushed_commits"] == 1
    ws = Path(handle.spec.workspace)
    head_before = git("rev-parse", "HEAD", cwd=ws).strip()
    assert await handle.finish() == 0

    last = fake_api.bodies()[-1]["work"]
    assert last["wip_branch"] == "orz/s1" and last.get("wip_error") is None
    bare = _bare_path(url)
    assert git("rev-parse", "orz/s1", cwd=bare).strip() == last["wip_commit"]
    assert git("show", "orz/s1:app.py", cwd=bare) == "changed\n"
    assert git("show", "orz/s1:notes.txt", cwd=bare) == "new\n"
    assert git("log", "--format=%s", "-3", "orz/s1", cwd=bare).splitlines()[:2] == [
        "WIP: uncommitted work of orz session s1", "local-only"]
    # The workspace itself is as the agent left it: same HEAD, the changes still uncommitted.
    assert git("rev-parse", "HEAD", cwd=ws).strip() == head_before
    assert (ws / "app.py").read_text() == "changed\n"
    assert "notes.txt" in git("status", "--porcelain", cwd=ws)


async def test_a_clean_workspace_pushes_nothing(make_repo: MakeRepo, start_runner: StartRunner,
                                                fake_api: FakeApi) -> None:
    url = make_repo({"app.py": "print(1)\n"})
    handle = await start_runner(url, work_scan_s=0.5)
    await fake_api.wait_for(lambda b: b.get("work") is not None, timeout=15)
    assert await handle.finish() == 0
    assert fake_api.bodies()[-1]["work"].get("wip_branch") is None
    assert "orz/s1" not in git("branch", "--list", cwd=_bare_path(url))


async def test_an_origin_that_refuses_the_push_is_reported_and_the_stop_goes_on(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    url = make_repo({"app.py": "print(1)\n"})
    handle = await start_runner(url, program="bash -c 'echo x > app.py; sleep infinity'", work_scan_s=0.5)
    await fake_api.wait_for(lambda b: (b.get("work") or {}).get("dirty_files") == 1, timeout=15)
    hook = _bare_path(url) / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'no pushes here' >&2\nexit 1\n")
    hook.chmod(0o755)
    assert await handle.finish() == 0
    last = fake_api.bodies()[-1]["work"]
    assert last.get("wip_branch") is None and "no pushes here" in last["wip_error"] and last["dirty_files"] == 1


async def test_an_api_of_the_previous_release_still_gets_heartbeats(start_runner: StartRunner,
                                                                    fake_api: FakeApi) -> None:
    """A rolling upgrade: an API replica that does not know the agent fields refuses them (422)."""
    fake_api.unknown_fields = frozenset({"agent_state", "agent_message", "agent_exit_code", "work"})
    handle = await start_runner(None, program="bash -c 'orz-session state idle; sleep infinity'")
    await handle.ready()
    await asyncio.sleep(1.5)
    assert handle.runner.activity.agent_state == "idle"
    assert all("agent_state" not in b for b in fake_api.bodies())
    assert fake_api.bodies()[-1]["program_running"] is True


async def test_a_login_shell_at_its_prompt_is_idle_and_a_program_it_runs_can_need_input(
        start_runner: StartRunner, fake_api: FakeApi) -> None:
    handle = await start_runner(None, program=None, needs_input_after_s=1)
    if not runs_login_shell(None, None, handle.runner.shell):
        pytest.skip("claude is installed: the session runs it, not a login shell")
    await fake_api.wait_for(lambda b: b.get("agent_state") == "idle", timeout=15)
    before = len(fake_api.bodies())
    await handle.runner.tmux.run("send-keys", "-t", "main", "python3 -c 'input(\"name? \")'", "Enter")
    body = await fake_api.wait_for(lambda b: b.get("agent_state") == "needs_input"
                                   and b in fake_api.bodies()[before:], timeout=15)
    assert body["agent_message"].startswith("python3 is waiting for input")


async def test_a_quiet_server_polling_its_socket_is_not_asking_anything(start_runner: StartRunner,
                                                                        fake_api: FakeApi) -> None:
    handle = await start_runner(None, program="python3 -m http.server --bind 127.0.0.1 0",
                                needs_input_after_s=1)
    await handle.ready()
    await asyncio.sleep(4)
    assert {b.get("agent_state") for b in fake_api.bodies()} <= {None, "working"}


def test_hooks_of_an_unexpected_shape_are_left_as_they_are() -> None:
    odd = {"hooks": "see ~/my-hooks"}
    assert agent.merge_claude_hooks(odd, "/x/orz-session") == odd
    mixed = {"hooks": {"Stop": {"not": "a list"}}}
    merged = agent.merge_claude_hooks(mixed, "/x/orz-session")
    assert merged["hooks"]["Stop"] == {"not": "a list"}  # type: ignore[index]
    assert "orz-session" in json.dumps(merged["hooks"]["Notification"])  # type: ignore[index]


async def test_what_a_connection_changed_is_in_the_next_heartbeat(make_repo: MakeRepo, start_runner: StartRunner,
                                                                  fake_api: FakeApi) -> None:
    """`ssh <id> 'echo x > new.txt'`, then `orz cloud kill`: the kill is judged on the work as the connection
    left it, not on a periodic scan from before it (here 10 minutes apart)."""
    url = make_repo({"app.py": "print(1)\n"})
    handle = await start_runner(url, work_scan_s=600)
    await fake_api.wait_for(lambda b: (b.get("work") or {}).get("dirty_files") == 0, timeout=15)
    async with await handle.connect() as conn:
        done = await conn.run("echo precious > new.txt")
        assert done.exit_status == 0
    body = await fake_api.wait_for(lambda b: (b.get("work") or {}).get("dirty_files") == 1, timeout=10)
    assert body["work"]["unpushed_commits"] == 0
    assert await handle.finish() == 0
