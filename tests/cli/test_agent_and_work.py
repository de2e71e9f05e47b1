"""`orz cloud list/status` show what the agent is doing; `orz cloud kill` refuses to lose unsaved work."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from api import schemas
from tests.cli.conftest import LiveApi, Orz
from tests.cli.test_cloud_commands import assert_one_error_line, create
from tests.conftest import Tenant


def test_list_and_status_show_the_agent_state(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                               tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid, agent_state="needs_input", agent_message="approve the migration?")
    lines = orz("cloud", "list").stdout.splitlines()
    row = next(line for line in lines if line.startswith(sid))
    assert row.split()[1:3] == ["running", "needs"] and "needs input" in row and len(row) <= 80
    listing = json.loads(orz("cloud", "list", "--json").stdout)
    assert listing["instances"][0]["agent_state"] == "needs_input"
    status = orz("cloud", "status", sid)
    assert "agent:       needs input: approve the migration?" in status.stdout
    assert "needs_input  needs_input: approve the migration?" in status.stdout  # the event
    st = json.loads(orz("cloud", "status", sid, "--json").stdout)
    assert st["instance"]["agent_message"] == "approve the migration?"
    live_api.heartbeat(sid, agent_state="exited", agent_exit_code=3)
    row = next(line for line in orz("cloud", "list").stdout.splitlines() if line.startswith(sid))
    assert "exited 3" in row


def test_kill_refuses_unsaved_work_unless_forced_or_saved(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                           tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid, work=schemas.WorkState(dirty_files=2, unpushed_commits=1))
    refused = orz("cloud", "kill", sid)
    assert refused.returncode == 6  # EXIT_UNSAVED_WORK (docs/cli.md)
    assert_one_error_line(refused, f"session {sid} has unsaved work: 2 uncommitted files, 1 unpushed commit",
                          "--force")
    assert json.loads(orz("cloud", "status", sid, "--json").stdout)["instance"]["status"] == "running"
    status = orz("cloud", "status", sid)
    assert "work:        2 uncommitted files, 1 unpushed commit" in status.stdout

    # Saved to the WIP branch: nothing is lost, the kill goes through.
    live_api.heartbeat(sid, work=schemas.WorkState(dirty_files=2, unpushed_commits=1, wip_branch=f"orz/{sid}",
                                                   wip_commit="a" * 40))
    assert orz("cloud", "kill", sid).returncode == 0

    other = create(orz, cwd=tmp_path)
    live_api.heartbeat(other, work=schemas.WorkState(dirty_files=1, wip_error="remote: no pushes here"))
    assert_one_error_line(orz("cloud", "kill", other), "not saved: remote: no pushes here")
    forced = orz("cloud", "kill", other, "--force")
    assert forced.returncode == 0 and "killed" in forced.stdout, forced.stderr


def test_status_shows_a_runners_escape_sequences_inert(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                       tmp_path: Path) -> None:
    # The runner (and the agent, which can read its token) is not trusted: what it reports must not drive
    # the terminal of whoever reads the session (its owner, an org admin): no OSC 52 clipboard write, no
    # title change, no line rewritten by a carriage return.
    sid = create(orz, cwd=tmp_path)
    hostile = "done\x1b]52;c;cm0gLXJmIH4=\x07\x1b]0;owned\x07\rall tests pass\x1b[2K\x9b1m"
    live_api.heartbeat(sid, program_events=[schemas.ProgramEvent(kind="program_exited", exit_code=1,
                                                                 message=hostile)])
    shown = orz("cloud", "status", sid)
    assert shown.returncode == 0, shown.stderr
    assert "program_exited  done\ufffd]52;c;cm0gLXJmIH4=\ufffd" in shown.stdout  # the event, made inert
    assert "exited:      done\ufffd" in shown.stdout  # the program's exit line
    live_api.heartbeat(sid, fatal_error=hostile)
    failed = orz("cloud", "status", sid)
    assert "status:      failed (done\ufffd]52;c;" in failed.stdout
    for out in (shown.stdout, failed.stdout):
        assert not any(ch in out for ch in "\x1b\x07\r\x9b"), repr(out)
    assert json.loads(orz("cloud", "status", sid, "--json").stdout)["instance"]["reason"] == hostile  # as stored


def test_api_refuses_to_delete_unsaved_work_unless_forced(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                          tmp_path: Path) -> None:
    """Automation calling DELETE itself gets the guard the CLI has: a 409 naming the work, ?force=true to go on."""
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid, work=schemas.WorkState(dirty_files=3, unpushed_commits=1))
    url = f"{live_api.url}/v1/instances/{sid}"
    refused = httpx.delete(url, headers=logged_in.headers)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["code"] == "unsaved_work"
    assert problem["work"]["dirty_files"] == 3 and problem["work"]["unpushed_commits"] == 1
    assert problem["detail"].startswith(f"session {sid} has unsaved work: 3 uncommitted files, 1 unpushed commit")
    assert "?force=true" in problem["detail"]
    assert httpx.get(url, headers=logged_in.headers).json()["status"] == "running"
    for value in ("yes please", ""):  # a blank is not "false"
        bad = httpx.delete(url, params={"force": value}, headers=logged_in.headers)
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "force", bad.text
    forced = httpx.delete(url, params={"force": "true"}, headers=logged_in.headers)
    assert forced.status_code == 200 and forced.json()["status"] == "deleted", forced.text


def test_kill_force_reaches_the_api(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    """The work appears after the CLI could have looked: the API still refuses, and --force is what it passes."""
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid, work=schemas.WorkState(unpushed_commits=2))
    refused = orz("cloud", "kill", sid)
    assert refused.returncode == 6
    assert_one_error_line(refused, f"session {sid} has unsaved work: 0 uncommitted files, 2 unpushed commits",
                          "kill with --force")
    forced = orz("cloud", "kill", sid, "--force")
    assert forced.returncode == 0 and "killed" in forced.stdout, forced.stderr


def test_kill_names_the_files_and_says_when_the_work_could_not_be_checked(orz: Orz, live_api: LiveApi,
                                                                          logged_in: Tenant, tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid, work=schemas.WorkState(dirty_files=2, files=["notes.md", '"odd\\tname.txt"']))
    refused = orz("cloud", "kill", sid)
    assert refused.returncode == 6
    assert_one_error_line(refused, f"session {sid} has unsaved work: 2 uncommitted files (notes.md, "
                                   '"odd\\tname.txt"), 0 unpushed commits; push it, or kill with --force')

    # A provider whose runners report on stop: the session is stopped first, and no report comes here.
    other = create(orz, cwd=tmp_path)
    live_api.heartbeat(other, work=schemas.WorkState())
    service = live_api.app.ctx.state.instances
    live_api.provider.reports_final_work = True
    service.settings = service.settings.model_copy(update={"delete_work_wait_s": 0.5})
    unknown = orz("cloud", "kill", other)
    assert unknown.returncode == 6
    assert_one_error_line(unknown, f"session {other} did not report its workspace's final state within 0.5 s",
                          "it is stopped with its workspace kept", "or kill with --force")
    assert json.loads(orz("cloud", "status", other, "--json").stdout)["instance"]["status"] == "stopped"
    assert orz("cloud", "kill", other, "--force").returncode == 0
