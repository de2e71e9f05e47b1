"""Cloning (real git, bare repo fixtures) and the run-once init."""

from __future__ import annotations

import base64
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from api.instances.providers.base import without_operator_records
from api.instances.providers.local import runner_log_for_users
from runner import workspace
from runner.errors import CloneError, InitError
from runner.main import LOG_FORMAT
from runner.workspace import INIT_MARKER, clone, git_env, init_done, run_init
from tests.runner.conftest import MakeRepo, git

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]
ENV = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}


async def test_clone_checks_out_the_branch_shallow(make_repo: MakeRepo, short_tmp: Path) -> None:
    url = make_repo({"README": "main\n"}, extra_branches={"feature/x": {"FEATURE": "yes\n"}})
    dest = short_tmp / "ws"
    assert await clone(url, "feature/x", dest, env=ENV)
    assert (dest / "FEATURE").read_text() == "yes\n"
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=dest).strip() == "feature/x"
    assert git("rev-list", "--count", "HEAD", cwd=dest).strip() == "1"  # shallow
    # a second start keeps the checkout (and whatever the user changed in it)
    (dest / "mine.txt").write_text("local work")
    assert not await clone(url, "feature/x", dest, env=ENV)
    assert (dest / "mine.txt").exists()


async def test_clone_of_missing_branch_is_a_clone_error(make_repo: MakeRepo, short_tmp: Path) -> None:
    url = make_repo({"README": "x"})
    with pytest.raises(CloneError, match=r"git clone of file://.* failed"):
        await clone(url, "nope", short_tmp / "ws", env=ENV)


async def test_clone_error_names_what_git_found_not_its_closing_advice(short_tmp: Path) -> None:
    """git ends a failed fetch with "Please make sure you have the correct access rights / and the repository
    exists."; the reason a user reads is the line before that advice."""
    not_a_repo = short_tmp / "plain-dir"
    not_a_repo.mkdir()
    with pytest.raises(CloneError) as caught:
        await clone(not_a_repo.as_uri(), None, short_tmp / "ws", env=ENV)
    message = str(caught.value)
    assert "does not appear to be a git repository" in message, message
    assert "the repository exists" not in message


def test_git_token_travels_as_a_scoped_header_in_env_only() -> None:
    env = git_env(ENV, "https://github.com/o/r.git", "tok-123")
    assert env["GIT_CONFIG_COUNT"] == "1"
    assert env["GIT_CONFIG_KEY_0"] == "http.https://github.com/.extraHeader"
    basic = base64.b64encode(b"x-access-token:tok-123").decode()
    assert env["GIT_CONFIG_VALUE_0"] == f"Authorization: Basic {basic}"
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert "GIT_CONFIG_COUNT" not in git_env(ENV, "file:///tmp/r.git", "tok-123")


async def test_git_token_is_not_written_to_git_config(make_repo: MakeRepo, short_tmp: Path) -> None:
    url = make_repo({"README": "x"})
    dest = short_tmp / "ws"
    await clone(url, "main", dest, env=ENV, token="tok-SECRET-456")
    for path in (dest / ".git").rglob("*"):
        if path.is_file():
            assert b"tok-SECRET-456" not in path.read_bytes(), path


async def test_init_runs_once_and_logs(short_tmp: Path) -> None:
    ws, log = short_tmp / "ws", short_tmp / "state" / "init.log"
    ws.mkdir()
    first = await run_init("echo ran >> count.txt; echo init-output", ws, log, env=ENV)
    second = await run_init("echo ran >> count.txt", ws, log, env=ENV)
    assert first.ran and not second.ran
    assert (ws / "count.txt").read_text() == "ran\n"
    assert init_done(ws) and (ws / INIT_MARKER).exists()
    assert "init-output" in log.read_text()


async def test_failed_or_slow_init_is_an_error_and_runs_again(short_tmp: Path) -> None:
    ws, log = short_tmp / "ws", short_tmp / "init.log"
    ws.mkdir()
    with pytest.raises(InitError, match="exit status 3"):
        await run_init("echo broken; exit 3", ws, log, env=ENV)
    assert not init_done(ws)
    with pytest.raises(InitError, match="timed out"):
        await run_init("sleep 30", ws, log, env=ENV, timeout_s=0.5)
    assert "broken" in log.read_text()


async def test_pull_never_overwrites_an_untracked_file_the_new_head_adds(make_repo: MakeRepo,
                                                                         short_tmp: Path) -> None:
    from runner.workspace import refresh
    from tests.runner.test_runner import _push_fix

    url = make_repo({"app.txt": "v1\n"})
    dest = short_tmp / "ws"
    assert await clone(url, "main", dest, env=ENV)
    (dest / INIT_MARKER).write_text("ok\n")  # setup succeeded: only --pull updates it
    (dest / "app.txt").write_text("v1 and my edit\n")
    (dest / "notes.md").write_text("my own notes\n")  # untracked here, and the new head adds it
    bare = Path(url.removeprefix("file://"))
    src = bare.with_name(bare.name.replace("repo", "src").removesuffix(".git"))
    (src / "notes.md").write_text("the project's notes\n")
    git("add", "notes.md", cwd=src)
    _push_fix(url, {"app.txt": "v2\n"})

    done = await refresh(url, dest, env=ENV, pull=True)
    assert not done.moved
    assert (dest / "notes.md").read_text() == "my own notes\n"
    assert (dest / "app.txt").read_text() == "v1 and my edit\n"  # the stash was put back
    assert any("could not update the workspace" in n and "notes.md" in n for n in done.notes), done.notes
    assert "[orz] the stashed changes are back in place" in done.notes
    assert git("stash", "list", cwd=dest).strip() == ""


def test_each_start_labels_its_part_of_the_init_log(tmp_path: Path) -> None:
    """After a restart, a user reading the init log tells the current start's lines from earlier ones."""
    log_path = tmp_path / "state" / "init.log"
    at = datetime(2026, 12, 6, 15, 20, 1, tzinfo=UTC)
    assert workspace.mark_start(log_path, at) == 1
    workspace.note(log_path, ["[orz] updated the workspace"])
    with log_path.open("a") as out:
        out.write("npm install: killed mid-li")  # the first run was stopped before its output ended a line
    assert workspace.mark_start(log_path, at + timedelta(hours=1)) == 2
    assert log_path.read_text().splitlines() == [
        "[orz] start 1, 2026-12-06 15:20:01 UTC", "[orz] updated the workspace", "npm install: killed mid-li",
        "[orz] start 2, 2026-12-06 16:20:01 UTC"]


def test_an_init_log_the_session_made_a_fifo_does_not_stop_its_next_start(tmp_path: Path) -> None:
    log_path = tmp_path / "init.log"
    os.mkfifo(log_path)
    assert workspace.mark_start(log_path, datetime.now(UTC)) == 0  # neither hangs nor raises
    target = tmp_path / "key"
    target.write_text("KEY\n")
    log_path.unlink()
    log_path.symlink_to(target)
    assert workspace.mark_start(log_path, datetime.now(UTC)) == 0 and target.read_text() == "KEY\n"


async def test_clone_errors_do_not_tell_the_hosts_network_apart(
        make_repo: MakeRepo, short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No such name, nothing listening, something listening that is no git server (TLS fails), over https, ssh
    and git://: the session's error reads the same for each, not as a probe of the operator's network; the
    runner's log keeps git's line for operators. A git server's own answer (no such branch) is still told."""
    import socket
    import threading

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()

    def answer_garbage() -> None:
        while True:
            try:
                conn, _ = listening.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nnot tls\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    open_port = listening.getsockname()[1]
    urls = ["https://no-such-host.invalid/a.git", f"https://127.0.0.1:{closed}/a.git",
            f"https://127.0.0.1:{open_port}/a.git", f"ssh://git@127.0.0.1:{closed}/a.git",
            "git@no-such-host.invalid:a/b.git", f"git://127.0.0.1:{closed}/a"]
    env = {**ENV, "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes"}
    reasons = []
    try:
        for i, url in enumerate(urls):
            with pytest.raises(CloneError) as caught:
                await clone(url, None, short_tmp / f"ws{i}", env=env)
            reasons.append(str(caught.value).split(" failed: ", 1)[1])
    finally:
        listening.close()
    assert reasons == [workspace.UNREACHABLE] * len(urls), reasons
    # True for a host the server's DNS failed on too: it does not tell the user their URL is wrong.
    assert "from the server" in workspace.UNREACHABLE and "check repo_url" not in workspace.UNREACHABLE
    logged = caplog.text
    assert "Could not resolve host" in logged and "Connection refused" in logged
    # ... for operators: `orz cloud logs` shows the session's owner the runner's warnings, but not these.
    runner_log = "".join(logging.Formatter(LOG_FORMAT).format(r) + "\n" for r in caplog.records)
    assert "Connection refused" in runner_log
    for shown in (runner_log_for_users(runner_log), without_operator_records(runner_log)):
        assert "Could not resolve" not in shown and "Connection refused" not in shown, shown
    with pytest.raises(CloneError) as caught:
        await clone(make_repo({"README": "x"}), "nope", short_tmp / "ws", env=ENV)
    assert workspace.UNREACHABLE not in str(caught.value) and "nope" in str(caught.value)
