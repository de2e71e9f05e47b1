"""The whole runner in-process (real git, tmux, asyncssh) against a fake heartbeat API."""

from __future__ import annotations

import asyncio
import socket
from datetime import datetime
from pathlib import Path

import pytest

from tests.runner.conftest import MakeRepo, StartRunner
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
    for _ in range(30):
        screen = await handle.runner.tmux.capture()
        if "[pg" in screen:
            break
        await asyncio.sleep(0.1)
    assert "[pg://u:pw1@x][k2][none]" in screen


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
        ("version: '1.0'\nservices:\n  q:\n    image: rabbitmq:3\n", "cannot run on the local provider"),
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


async def test_a_workspace_someone_changed_is_never_reset(make_repo: MakeRepo, start_runner: StartRunner,
                                                          fake_api: FakeApi) -> None:
    url = make_repo({".orz/cloud.yaml": BAD_INIT, "notes.txt": "original\n"})
    first = await start_runner(url)
    assert await asyncio.wait_for(first.task, 15) == 2
    workspace = Path(first.runner.workspace)
    (workspace / "notes.txt").write_text("my unsaved work\n")
    _push_fix(url, {".orz/cloud.yaml": GOOD_INIT})

    second = await start_runner(url)
    assert await asyncio.wait_for(second.task, 15) == 2  # still the old config: nothing was overwritten
    assert (workspace / "notes.txt").read_text() == "my unsaved work\n"
    assert "exit status 9" in fake_api.bodies()[-1]["fatal_error"]
