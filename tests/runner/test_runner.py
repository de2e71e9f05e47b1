"""The whole runner in-process (real git, tmux, asyncssh) against a fake heartbeat API."""

from __future__ import annotations

import asyncio
import socket
from datetime import datetime
from pathlib import Path

import pytest

from tests.runner.conftest import MakeRepo, RunningRunner, StartRunner, wait_for_pane
from tests.runner.fake_api import FakeApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_heartbeats_report_endpoint_init_and_program(make_repo: MakeRepo, start_runner: StartRunner,
                                                          fake_api: FakeApi) -> None:
    url = make_repo({".orz/cloud.yaml": 'version: "1.0"\nsetup:\n  init: echo init-says-hello\n'})
    handle = await start_runner(url)
    ready = await handle.ready()
    assert ready["host_key"].startswith("ssh-ed25519 ")
    assert ready["ssh_host"] == "127.0.0.1" and ready["ssh_port"] > 0
    assert ready["init_status"] == "succeeded"
    tails = [b["init_log_tail"] for b in fake_api.bodies() if b.get("init_log_tail")]
    assert len(tails) == 1 and "init-says-hello" in tails[0]  # sent once, not in every heartbeat
    assert fake_api.tokens[0] == "Bearer runner-token-1"
    assert handle.runner.activity.fatal_error is None
    assert await handle.finish() == 0
    last = fake_api.bodies()[-1]
    assert last["program_running"] is False
    assert not handle.runner.tmux.socket.exists() or not (await handle.runner.tmux.pane_state()).exists


async def test_program_output_with_nobody_attached_moves_last_output_at(
        start_runner: StartRunner, fake_api: FakeApi) -> None:
    handle = await start_runner(None, program="bash -c 'echo hi; sleep 2; echo later; sleep infinity'")
    first = await handle.ready()
    assert first["attached_clients"] == 0
    t0 = datetime.fromisoformat(first["last_output_at"])
    moved = await fake_api.wait_for(
        lambda b: b.get("last_output_at") and datetime.fromisoformat(b["last_output_at"]) > t0, timeout=8)
    assert moved["attached_clients"] == 0 and moved.get("last_input_at") is None


async def test_heartbeats_survive_an_api_outage(start_runner: StartRunner, fake_api: FakeApi) -> None:
    fake_api.fail = True
    handle = await start_runner(None)
    await asyncio.sleep(1.5)
    assert fake_api.bodies() == []
    fake_api.fail = False
    await handle.ready(timeout=10)


async def test_secrets_reach_the_program_env_but_not_the_runner_token(
        make_repo: MakeRepo, start_runner: StartRunner) -> None:
    url = make_repo({".orz/cloud.yaml": 'version: "1.0"\nenv:\n  DB_URL: "pg://u:${DB_PASS}@x"\n'})
    program = "bash -c 'echo \"[$DB_URL][$API_KEY][${ORZ_RUNNER_TOKEN-none}]\"; sleep infinity'"
    handle = await start_runner(url, program=program,
                                secrets={"DB_PASS": "pw1", "API_KEY": "k2"},
                                extra_env={"ORZ_RUNNER_TOKEN": "runner-token-1", "UNRELATED": "x"})
    await handle.ready()
    screen = await wait_for_pane(handle.runner.tmux, "[pg", timeout=3.0)
    assert "[pg://u:pw1@x][k2][none]" in screen


async def test_dotted_env_keys_reach_the_program(make_repo: MakeRepo, start_runner: StartRunner) -> None:
    # Debian's /bin/sh (dash) drops variables whose names are not shell identifiers from what it passes on;
    # the wrapper around the program must not be the one to drop them (docs/migrating-from-go.md).
    url = make_repo({".orz/cloud.yaml": "env:\n  discovery.type: single-node\n  xpack-enabled: 'no'\n"})
    program = "echo \"[$(printenv discovery.type)][$(printenv xpack-enabled)]\"; sleep infinity"
    handle = await start_runner(url, program=program)
    await handle.ready()
    screen = await wait_for_pane(handle.runner.tmux, "]", timeout=3.0)
    assert "[single-node][no]" in screen


async def test_clone_failure_is_fatal(make_repo: MakeRepo, start_runner: StartRunner,
                                     fake_api: FakeApi) -> None:
    handle = await start_runner(make_repo({"README": "x"}), branch="no-such-branch")
    assert await asyncio.wait_for(handle.task, 15) == 2
    fatal = fake_api.bodies()[-1]["fatal_error"]
    assert fatal.startswith("git clone of file://") and "no-such-branch" in fatal


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("version: '1.0'\nsetup: [\n  - a\n b: c\n", ".orz/cloud.yaml:3: invalid YAML"),
        ("services:\n  my_db:\n    image: redis\n  My-DB:\n    image: redis\n",
         ".orz/cloud.yaml:1: services: services 'my_db' and 'My-DB' both become container name 'my-db'"),
        ("version: '1.0'\nservices:\n" + "".join(f"  s{i}:\n    image: redis\n" for i in range(6)),
         ".orz/cloud.yaml:2: services: at most 5 services"),
        ("version: '1.0'\nresources:\n  memory: lots\n", ".orz/cloud.yaml:3: resources.memory:"),
        ("version: '1.0'\nenv:\n  X: ${NOT_A_SECRET}\n", ".orz/cloud.yaml:3: env.X: ${NOT_A_SECRET}"),
        ("version: '1.0'\nsetup:\n  init: exit 9\n", "setup.init failed with exit status 9"),
        # Refused before the redis before it starts, naming the file, line and key.
        ("version: '1.0'\nservices:\n  cache:\n    image: redis:7\n  q:\n    image: rabbitmq:3\n",
         ".orz/cloud.yaml:6: services.q.image: rabbitmq:3 cannot run on the local provider"),
    ],
)
async def test_bad_config_is_fatal_reported_and_leaves_nothing(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi, config: str, expected: str
) -> None:
    handle = await start_runner(make_repo({".orz/cloud.yaml": config}))
    code = await asyncio.wait_for(handle.task, 15)
    assert code == 2
    fatal = fake_api.bodies()[-1]
    assert fatal["fatal_error"].startswith(expected) or expected in fatal["fatal_error"], fatal
    assert fatal["program_running"] is False
    assert expected in (handle.runner.state_dir / "fatal_error").read_text()
    assert not (handle.runner.state_dir / "services" / "cache").exists()  # no service started before the refusal
    # nothing left running: no tmux server, nothing listening on the endpoint's port
    assert not (await handle.runner.tmux.pane_state()).exists
    if fatal.get("ssh_port"):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", fatal["ssh_port"]), timeout=1):
            pass


def _push_fix(url: str, files: dict[str, str]) -> None:
    """Commit ``files`` in the working copy behind make_repo's bare repository and push them."""
    from tests.runner.conftest import git

    bare = Path(url.removeprefix("file://"))
    src = bare.with_name(bare.name.replace("repo", "src").removesuffix(".git"))
    for rel, text in files.items():
        (src / rel).write_text(text)
    git("commit", "--quiet", "-am", "fix", cwd=src)
    git("push", "--quiet", str(bare), "main", cwd=src)


BAD_INIT = 'version: "1.0"\nsetup:\n  init: exit 9\n'
GOOD_INIT = 'version: "1.0"\nsetup:\n  init: echo fixed >> init-runs.txt\n'


async def test_a_start_after_a_failed_first_start_picks_up_the_fixed_repository(
        make_repo: MakeRepo, start_runner: StartRunner) -> None:
    url = make_repo({".orz/cloud.yaml": BAD_INIT})
    first = await start_runner(url)
    assert await asyncio.wait_for(first.task, 15) == 2
    _push_fix(url, {".orz/cloud.yaml": GOOD_INIT})

    second = await start_runner(url)  # same session: same workspace
    ready = await second.ready()
    assert ready["init_status"] == "succeeded"
    workspace = Path(second.runner.workspace)
    assert (workspace / ".orz/cloud.yaml").read_text() == GOOD_INIT
    assert (workspace / "init-runs.txt").read_text() == "fixed\n"
    assert await second.finish() == 0


# The case: a failing init that wrote files, so the checkout is no longer untouched.
WRITING_BAD_INIT = 'version: "1.0"\nsetup:\n  init: echo half-done > build.log; exit 9\n'


async def running(handle: RunningRunner) -> None:
    """Wait until this runner (not an earlier one of the same session) has its program running."""
    for _ in range(150):
        if handle.runner.activity.program_running:
            return
        if handle.task.done():
            raise AssertionError(f"runner exited: {handle.runner.activity.fatal_error}")
        await asyncio.sleep(0.1)
    raise AssertionError("the runner did not get ready")


def stash_show(workspace: Path) -> str:
    from tests.runner.conftest import git

    return git("-C", str(workspace), "stash", "show", "--include-untracked", "-p", "stash@{0}")


async def test_a_failed_init_that_wrote_files_still_picks_up_the_fix_and_keeps_every_edit(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    url = make_repo({".orz/cloud.yaml": WRITING_BAD_INIT, "notes.txt": "original\n"})
    first = await start_runner(url)
    assert await asyncio.wait_for(first.task, 15) == 2
    workspace = Path(first.runner.workspace)
    assert (workspace / "build.log").exists()
    (workspace / "notes.txt").write_text("my unsaved work\n")
    _push_fix(url, {".orz/cloud.yaml": GOOD_INIT})

    second = await start_runner(url)
    ready = await second.ready()
    assert ready["init_status"] == "succeeded"  # the new init ran, not the old one again
    assert (workspace / "init-runs.txt").read_text() == "fixed\n"
    # Nothing is lost: the edit and the file the failed init wrote are in a named stash, and the log says so.
    stashed = stash_show(workspace)
    assert "+my unsaved work" in stashed and "+half-done" in stashed
    log = (Path(second.runner.state_dir) / "init.log").read_text()
    assert "[orz] uncommitted changes and untracked files were stashed" in log
    assert "get them back with: git stash pop" in log
    assert "[orz] workspace updated to origin/main's head" in log
    assert await second.finish() == 0


async def test_a_workspace_with_its_own_commits_is_kept_and_says_why(
        make_repo: MakeRepo, start_runner: StartRunner, fake_api: FakeApi) -> None:
    from tests.runner.conftest import git

    url = make_repo({".orz/cloud.yaml": BAD_INIT, "notes.txt": "original\n"})
    first = await start_runner(url)
    assert await asyncio.wait_for(first.task, 15) == 2
    workspace = Path(first.runner.workspace)
    (workspace / "notes.txt").write_text("committed work\n")
    git("-C", str(workspace), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qam", "mine")
    _push_fix(url, {".orz/cloud.yaml": GOOD_INIT})

    second = await start_runner(url)
    assert await asyncio.wait_for(second.task, 15) == 2  # still the old config: nothing was overwritten
    assert (workspace / "notes.txt").read_text() == "committed work\n"
    fatal = fake_api.bodies()[-1]
    assert "exit status 9" in fatal["fatal_error"]
    assert "it has commits of its own; kept as it is" in fatal["init_log_tail"]


async def test_a_plain_start_keeps_the_work_of_a_session_with_no_setup_init(
        make_repo: MakeRepo, start_runner: StartRunner) -> None:
    """A repository without .orz/cloud.yaml (most of them) never wrote the init marker, so every start
    (`orz server` restarting, wake on connect) moved the workspace to origin's new head and stashed the
    agent's uncommitted edits and untracked files, which the docs promise only before setup ever finished."""
    from tests.runner.conftest import git

    url = make_repo({"app.txt": "v1\n"})
    first = await start_runner(url)
    await running(first)
    assert await first.finish() == 0
    workspace = Path(first.runner.workspace)
    (workspace / "app.txt").write_text("v1 and my edit\n")
    (workspace / "new.txt").write_text("a file the agent made\n")
    _push_fix(url, {"app.txt": "v2\n"})

    again = await start_runner(url)
    await running(again)
    assert (workspace / "app.txt").read_text() == "v1 and my edit\n"
    assert (workspace / "new.txt").read_text() == "a file the agent made\n"
    assert git("-C", str(workspace), "stash", "list") == ""
    assert await again.finish() == 0


async def test_start_with_pull_updates_a_workspace_whose_setup_succeeded(
        make_repo: MakeRepo, start_runner: StartRunner) -> None:
    url = make_repo({".orz/cloud.yaml": GOOD_INIT, "app.txt": "v1\n"})
    first = await start_runner(url)
    await first.ready()
    assert await first.finish() == 0
    workspace = Path(first.runner.workspace)
    _push_fix(url, {"app.txt": "v2\n"})

    plain = await start_runner(url)  # a plain start keeps a set-up workspace as it is
    await running(plain)
    assert (workspace / "app.txt").read_text() == "v1\n"
    assert await plain.finish() == 0

    (workspace / "app.txt").write_text("v1 and my edit\n")
    pulled = await start_runner(url, pull=True)
    await running(pulled)
    assert (workspace / "app.txt").read_text() == "v2\n"
    # What init made (untracked) stays; init ran once per workspace, not again; the edit is in the stash.
    assert (workspace / "init-runs.txt").read_text() == "fixed\n"
    assert "+v1 and my edit" in stash_show(workspace)
    log = (Path(pulled.runner.state_dir) / "init.log").read_text()
    assert "[orz] uncommitted changes were stashed" in log and "[orz] workspace updated to origin/main's head" in log
    assert await pulled.finish() == 0


_COMMIT_AND_SHOW = ("bash -c 'echo x > by-agent.txt && git add by-agent.txt && git commit -qm by-agent "
                    "&& git log -1 --format=\"[%an <%ae>][%cn <%ce>]\"; sleep infinity'")


async def test_a_commit_in_the_session_is_by_the_sessions_owner(make_repo: MakeRepo,
                                                                start_runner: StartRunner) -> None:
    # No identity anywhere (HOME has no .gitconfig): git's own guess fails ("Author identity unknown").
    handle = await start_runner(make_repo({"README": "x\n"}), program=_COMMIT_AND_SHOW,
                                owner_name="Ada Lovelace", owner_email="ada@example.com")
    await handle.ready()
    screen = await wait_for_pane(handle.runner.tmux, "][", timeout=5.0)
    assert "[Ada Lovelace <ada@example.com>][Ada Lovelace <ada@example.com>]" in screen
    # Nothing was written to the repository's own config: the user's choices stay theirs.
    config = (Path(handle.spec.workspace) / ".git" / "config").read_text()
    assert "ada@example.com" not in config


async def test_an_identity_the_user_configured_wins_over_the_owners(make_repo: MakeRepo,
                                                                    start_runner: StartRunner) -> None:
    init = "git config --global user.name Dot && git config --global user.email dot@files.example"
    url = make_repo({".orz/cloud.yaml": f'version: "1.0"\nsetup:\n  init: "{init}"\n'})
    handle = await start_runner(url, program=_COMMIT_AND_SHOW, owner_name="Ada", owner_email="ada@example.com")
    await handle.ready()
    screen = await wait_for_pane(handle.runner.tmux, "][", timeout=5.0)
    assert "[Dot <dot@files.example>][Dot <dot@files.example>]" in screen
