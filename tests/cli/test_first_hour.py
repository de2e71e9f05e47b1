"""A new user's first hour: what `orz cloud` tells them (real `orz` subprocess, real API, FakeProvider)."""

from __future__ import annotations

import json
from pathlib import Path

from api import schemas
from tests.cli.conftest import LiveApi, Orz
from tests.cli.test_cloud_commands import create
from tests.conftest import Tenant

EXIT_127 = "the program exited with code 127 (command not found; check --program)"


def program_event(kind: str, message: str, exit_code: int | None = None) -> schemas.ProgramEvent:
    return schemas.ProgramEvent(kind=kind, message=message, exit_code=exit_code)  # type: ignore[arg-type]


def test_new_says_how_the_task_reaches_a_program(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                 tmp_path: Path) -> None:
    done = orz("cloud", "new", "--no-attach", "--program", "bash", "say hello", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "the task reaches bash as $ORZ_TASK and the file $ORZ_TASK_FILE, not as an argument" in done.stderr
    sid = done.stdout.split()[1]
    assert live_api.provider.specs[sid].task == "say hello" and live_api.provider.specs[sid].program == "bash"
    quiet = orz("cloud", "new", "--no-attach", "--program", "claude --model opus", "say hello", cwd=tmp_path)
    assert quiet.returncode == 0 and "ORZ_TASK" not in quiet.stderr


def test_status_says_why_the_program_exited_until_it_restarts(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                             tmp_path: Path) -> None:
    sid = create(orz, "--program", "bash", "say hello", cwd=tmp_path)
    live_api.heartbeat(sid)
    live_api.heartbeat(sid, program_running=False, program_exit_code=127,
                       program_events=[program_event("program_exited", EXIT_127, 127)])
    status = orz("cloud", "status", sid)
    assert status.returncode == 0, status.stderr
    [line] = [x for x in status.stdout.splitlines() if x.startswith("exited:")]
    assert EXIT_127 in line and f"attaching restarts it (orz cloud attach {sid})" in line
    assert f"program_exited  {EXIT_127}" in status.stdout  # and among the events
    as_json = json.loads(orz("cloud", "status", sid, "--json").stdout)
    assert as_json["program_exit"]["message"] == EXIT_127

    live_api.heartbeat(sid, program_running=True,
                       program_events=[program_event("program_restarted", "the program was restarted for an attach")])
    status = orz("cloud", "status", sid)
    assert not [x for x in status.stdout.splitlines() if x.startswith("exited:")]
    assert json.loads(orz("cloud", "status", sid, "--json").stdout)["program_exit"] is None

    # An exit of an earlier run says nothing about the session once it started again.
    live_api.heartbeat(sid, program_running=False, program_events=[program_event("program_exited", EXIT_127, 127)])
    assert orz("cloud", "stop", sid).returncode == 0
    assert orz("cloud", "start", sid).returncode == 0
    live_api.heartbeat(sid)
    assert json.loads(orz("cloud", "status", sid, "--json").stdout)["program_exit"] is None


def test_status_of_a_failed_session_says_what_to_do_next(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                         tmp_path: Path) -> None:
    sid = create(orz, "--repo", "https://example.com/r.git", "--branch", "nope", cwd=tmp_path)
    live_api.heartbeat(sid, fatal_error="git clone of https://example.com/r.git failed: fatal: Remote branch nope "
                                        "not found in upstream origin")
    shown = orz("cloud", "status", sid)
    assert shown.returncode == 0, shown.stderr
    assert "status:      failed (git clone of https://example.com/r.git failed" in shown.stdout
    [line] = [x for x in shown.stdout.splitlines() if x.startswith("next:")]
    assert line == (f"next:        fix what the reason names (details: orz cloud logs {sid}), then orz cloud start "
                    f"{sid} tries again on the same workspace; or orz cloud kill {sid}")
    running = create(orz, cwd=tmp_path)
    live_api.heartbeat(running)
    assert "next:" not in orz("cloud", "status", running).stdout


def test_start_pull_reaches_the_runner_and_is_refused_while_running(orz: Orz, live_api: LiveApi,
                                                                    logged_in: Tenant, tmp_path: Path) -> None:
    sid = create(orz, "--repo", "https://example.com/acme/app.git", cwd=tmp_path)
    live_api.heartbeat(sid)
    refused = orz("cloud", "start", "--pull", sid)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"orz: session {sid} is running: --pull applies when it starts; run git pull "
                                      "in it, or stop it and start it again with --pull")
    assert orz("cloud", "stop", sid).returncode == 0
    done = orz("cloud", "start", "--pull", sid)
    assert done.returncode == 0, done.stderr
    assert f"what the update did is in its log: orz cloud logs {sid}" in done.stdout
    assert live_api.provider.specs[sid].pull is True
    status = orz("cloud", "status", sid)
    assert "stopped -> starting  updating the workspace to the branch's head (--pull)" in status.stdout
    assert orz("cloud", "stop", sid).returncode == 0
    assert orz("cloud", "start", sid).returncode == 0
    assert live_api.provider.specs[sid].pull is False  # only when asked


def test_token_prints_a_token_the_gateway_accepts(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                  tmp_path: Path) -> None:
    from gateway import auth

    sid = create(orz, cwd=tmp_path)
    live_api.heartbeat(sid)
    done = orz("cloud", "token", sid)
    assert done.returncode == 0, done.stderr
    [token] = done.stdout.splitlines()  # the token alone on stdout: `orz cloud token ID | ...` works
    assert "single use, until " in done.stderr and "paste it at the Token: prompt of: ssh -p " in done.stderr
    principal = auth.check_jwt(token, sid, auth.load_trust_anchors(live_api.app.ctx.state.settings))
    assert principal.user_id == logged_in.user_id and principal.method == "jwt" and not principal.readonly
    readonly = orz("cloud", "token", "--readonly", sid).stdout.strip()
    assert auth.check_jwt(readonly, sid, auth.load_trust_anchors(live_api.app.ctx.state.settings)).readonly


def _git_repo(path: Path) -> Path:
    import subprocess

    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q",
                    "--allow-empty", "-m", "one"], check=True)
    return path


def test_repo_may_be_a_local_path_and_a_refusal_says_how_to_allow_it(orz: Orz, live_api: LiveApi,
                                                                      logged_in: Tenant, tmp_path: Path) -> None:
    repo = _git_repo(tmp_path / "src" / "app")
    svc = live_api.app.ctx.state.instances
    svc.settings = svc.settings.model_copy(update={"repo_file_dirs": ""})
    refused = orz("cloud", "new", "--no-attach", "--repo", "src/app", cwd=tmp_path)
    assert refused.returncode == 2  # bad input (docs/cli.md)
    assert refused.stderr.splitlines()[-1] == (
        f"orz: the server does not clone {repo.as_uri()}: it clones local paths only from the directories its "
        f"admin lists in ORZ_REPO_FILE_DIRS (never from its data directory). On your own orz server, start it "
        f"with ORZ_REPO_FILE_DIRS={repo.parent} (e.g. ORZ_REPO_FILE_DIRS={repo.parent} make dev); otherwise "
        "push the repository and pass its URL")

    svc.settings = svc.settings.model_copy(update={"repo_file_dirs": str(repo.parent)})
    done = orz("cloud", "new", "--no-attach", "--repo", "src/app", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"the local repository is cloned from {repo.as_uri()}" in done.stderr
    sid = done.stdout.split()[1]
    assert live_api.provider.specs[sid].repo_url == repo.as_uri()
    # A URL is never taken for a path.
    assert orz("cloud", "new", "--no-attach", "--repo", "https://example.com/a.git", cwd=tmp_path).returncode == 0


def test_new_in_a_repository_without_origin_says_how_to_start_from_it(orz: Orz, live_api: LiveApi,
                                                                      logged_in: Tenant, tmp_path: Path) -> None:
    """`git init` and a commit, then `orz cloud new`: the empty workspace is no surprise, and --repo . is named."""
    import subprocess

    repo = tmp_path / "app"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q",
                    "--allow-empty", "-m", "init"], check=True)
    done = orz("cloud", "new", "--no-attach", cwd=repo)
    assert done.returncode == 0, done.stderr
    assert ("this repository has no origin remote, so the session starts with an empty workspace; to start it "
            "from this repository: orz cloud new --repo .") in done.stderr
    assert live_api.provider.specs[done.stdout.split()[1]].repo_url is None
    outside = orz("cloud", "new", "--no-attach", cwd=tmp_path)  # not a repository at all: as before
    assert "no git origin in this directory: the session starts with an empty workspace" in outside.stderr


def test_new_wait_shows_a_status_line_on_a_terminal_and_plain_lines_in_a_pipe(
        orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path) -> None:
    import io
    import re
    import sys
    import threading
    import time

    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "cli", "cloud", "new", "--no-attach", "--wait"],
                          env={**orz.env(), "TERM": "xterm"}, cwd=str(tmp_path), encoding="utf-8", timeout=20,
                          dimensions=(24, 120))
    child.logfile_read = seen = io.StringIO()
    child.expect(r"session (\S+) created")
    sid = child.match.group(1)
    child.expect(rf"session {sid} is starting \(\d+ s; Ctrl-C stops waiting\)")  # the live line
    beat = threading.Thread(target=lambda: (time.sleep(0.5), live_api.heartbeat(sid)), daemon=True)
    beat.start()
    child.expect(f"session {sid} is running")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # The state change seen under the live line starts a line of its own (it was written after the
    # spinner's text, and that line stayed on screen: "...Ctrl-C stops waiting)12:00:01  starting -> running").
    assert "starting -> running" in seen.getvalue()
    assert not re.search(r"waiting\)(\x1b\[[0-9;]*m)*\d\d:\d\d:\d\d", seen.getvalue()), seen.getvalue()
    # Not a terminal: no spinner, no control sequences, the same lines.
    with live_api.runners_heartbeating():
        piped = orz("cloud", "new", "--no-attach", "--wait", cwd=tmp_path)
    assert piped.returncode == 0 and "\x1b[" not in piped.stderr + piped.stdout
    assert "Ctrl-C stops waiting" not in piped.stderr


def test_deleting_a_secret_in_use_says_which_sessions_and_asks_for_force(orz: Orz, live_api: LiveApi,
                                                                         logged_in: Tenant, tmp_path: Path) -> None:
    assert orz("cloud", "secrets", "create", "gh", "--data", "GITHUB_TOKEN=ghp_x").returncode == 0
    assert orz("cloud", "secrets", "create", "spare", "--data", "K=v").returncode == 0
    sid = create(orz, "--secrets", "gh", cwd=tmp_path)
    live_api.heartbeat(sid)
    refused = orz("cloud", "secrets", "delete", "gh")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"orz: secret gh is used by session {sid} (running), which cannot start again without it (a running "
        "session keeps its values until it stops); kill them first, or delete it anyway with --force")
    assert "gh" in orz("cloud", "secrets", "list").stdout  # still there
    assert orz("cloud", "secrets", "delete", "spare").returncode == 0  # unused: no question asked
    forced = orz("cloud", "secrets", "delete", "--force", "gh")
    assert forced.returncode == 0 and "secret gh deleted" in forced.stdout
    assert f"warning: session {sid} (running) will fail to start until it is created again" in forced.stderr
