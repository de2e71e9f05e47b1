"""The local provider with real runner child processes (real git, tmux, asyncssh) and a fake heartbeat API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api.instances.providers.base import ComputeSpec
from api.instances.providers.local import PREVIOUS_RUNNER_LOG, RUNNER_LOG, LocalProvider, process_start_time
from api.settings import Settings
from runner.tmux import Tmux
from tests.api.lifecycle_support import local_provider
from tests.runner import conftest as runner_fixtures
from tests.runner.fake_api import FakeApi

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]

# Shared fixtures from the runner tests (bare repos, the gateway key, the fake heartbeat API).
short_tmp = runner_fixtures.short_tmp
make_repo = runner_fixtures.make_repo
gateway_key = runner_fixtures.gateway_key
fake_api = runner_fixtures.fake_api

CONFIG = 'version: "1.0"\nsetup:\n  init: echo ran >> init-runs.txt\n'


@pytest.fixture
async def provider(short_tmp: Path) -> AsyncIterator[LocalProvider]:
    async with local_provider(Settings(data_dir=short_tmp / "data", log_level="DEBUG",
                                       repo_file_dirs=str(short_tmp))) as p:
        yield p


def compute_spec(sid: str, fake_api: FakeApi, gateway_key: runner_fixtures.GatewayKey, repo: str | None, *,
                 secrets: dict[str, str] | None = None,
                 program: str = runner_fixtures.HI_PROGRAM) -> ComputeSpec:
    fake_api.expect(sid, "rt-secret-token")
    return ComputeSpec(
        session_id=sid, org_id="o1", user_id="u1", tier="small", resources={"cpu": "2"}, repo_url=repo,
        branch="main", program=program, task=None, api_url=fake_api.url,
        gateway_public_key=gateway_key.public, heartbeat_interval_s=1, runner_token="rt-secret-token",
        secret_env=secrets or {},
    )


async def wait_gone(pid: int, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if process_start_time(pid) is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"runner {pid} still running")


async def ready(fake_api: FakeApi, sid: str, after: int = 0) -> dict:
    """The first heartbeat after the ``after``-th saying the endpoint is up and the program runs."""
    for _ in range(300):
        for body in fake_api.bodies(sid)[after:]:
            if body.get("host_key") and body.get("program_running"):
                return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"no ready heartbeat after #{after}: {fake_api.bodies(sid)[-2:]}")


async def test_create_stop_start_runs_init_once_and_shows_the_program(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key) -> None:
    repo = make_repo({".orz/cloud.yaml": CONFIG, "README": "hello\n"})
    spec = compute_spec("sess-a", fake_api, gateway_key, repo, secrets={"API_KEY": "secret-value-xyz"})
    state = await provider.create(spec)
    assert (await provider.status("sess-a", state)).phase == "running"
    first = await ready(fake_api, "sess-a")
    assert first["init_status"] == "succeeded"
    base = provider.session_dir("sess-a")
    ws = base / "workspace"
    assert (ws / "README").read_text() == "hello\n"
    tmux = Tmux(base / "state" / "tmux.sock")
    for _ in range(30):
        if "hi" in await tmux.capture():
            break
        await asyncio.sleep(0.1)
    assert "hi" in await tmux.capture()

    # secrets reach the runner only through its environment
    cmdline = Path(f"/proc/{state['pid']}/cmdline").read_bytes()
    assert b"secret-value-xyz" not in cmdline and b"rt-secret-token" not in cmdline
    for path in base.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            assert b"secret-value-xyz" not in data and b"rt-secret-token" not in data, path

    stopped = await provider.stop("sess-a", state)
    assert process_start_time(state["pid"]) is None
    await provider.status("sess-a", stopped)  # reaps
    assert provider.exit_codes[state["pid"]] == 0  # a clean SIGTERM shutdown
    assert (await provider.status("sess-a", stopped)).phase == "stopped"
    assert fake_api.bodies("sess-a")[-1].get("ssh_host") is None  # the last word withdraws the route
    assert not (await tmux.pane_state()).exists
    assert ws.is_dir()

    seen = len(fake_api.bodies("sess-a"))
    state2 = await provider.start(spec, stopped)
    again = await ready(fake_api, "sess-a", after=seen)
    assert again["init_status"] == "succeeded"
    assert (ws / "init-runs.txt").read_text() == "ran\n"  # init ran exactly once across stop/start
    assert (ws / ".orz-init-done").exists()
    # Each start labels its part of the init log; what users read shows this start's part as the init log,
    # and the first start's setup output under a title of its own.
    shown = await provider.read_log("sess-a", state2)
    earlier, _, current = shown.partition("== init log ==\n")
    assert earlier.startswith("== init log, earlier starts ==\n[orz] start 1, ")
    assert "$ echo ran >> init-runs.txt" in earlier
    assert current.startswith("[orz] start 2, ") and "echo ran" not in current.split("== runner log ==")[0]
    assert set(await provider.list()) == {"sess-a"}

    await provider.delete("sess-a", state2)
    assert not base.exists()
    assert (await provider.status("sess-a", state2)).phase == "absent"
    await wait_gone(state2["pid"])


async def test_a_restarted_api_adopts_running_runners(
        provider: LocalProvider, short_tmp: Path, fake_api: FakeApi, gateway_key) -> None:
    state = await provider.create(compute_spec("sess-b", fake_api, gateway_key, None))
    await ready(fake_api, "sess-b")
    fresh = LocalProvider(Settings(data_dir=short_tmp / "data", repo_file_dirs=str(short_tmp)))
    assert (await fresh.status("sess-b", state)).phase == "running"
    assert (await fresh.list())["sess-b"].phase == "running"
    # a reused pid with another start time is not ours
    assert (await fresh.status("sess-b", {**state, "start_time": 1})).phase == "stopped"
    await fresh.stop("sess-b", state)
    await wait_gone(state["pid"])
    assert (await provider.status("sess-b", state)).phase == "stopped"


async def test_a_runner_whose_pid_was_never_recorded_is_found_not_started_twice(
        provider: LocalProvider, short_tmp: Path, fake_api: FakeApi, gateway_key) -> None:
    """Found by the soak: the API killed -9 between spawning a runner and recording its pid. The
    reconciler then saw the session's compute "stopped", started a second runner on the same workspace
    and left the first running for ever (its heartbeats refused)."""
    spec = compute_spec("sess-p", fake_api, gateway_key, None)
    state = await provider.create(spec)
    await ready(fake_api, "sess-p")
    pid_file = short_tmp / "data" / "sessions" / "sess-p" / "provider.json"
    pid_file.write_text(json.dumps({"pid": None, "spawn": state["spawn"], "dir": state["dir"]}))  # as left then
    fresh = LocalProvider(Settings(data_dir=short_tmp / "data", repo_file_dirs=str(short_tmp)))
    assert (await fresh.list())["sess-p"].phase == "running"
    assert (await fresh.status("sess-p", {})).phase == "running"
    again = await fresh.start(spec, {})  # what the reconciler's restart asks with the row's empty state
    assert again["pid"] == state["pid"]
    await fresh.stop("sess-p", {})
    await wait_gone(state["pid"])
    assert (await fresh.status("sess-p", {})).phase == "stopped"


async def test_bad_config_fails_with_the_reason_and_leaves_nothing(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key) -> None:
    repo = make_repo({".orz/cloud.yaml": "version: '1.0'\nresources:\n  cpu: 2\n  memory: 4Gb\n"})
    state = await provider.create(compute_spec("sess-c", fake_api, gateway_key, repo))
    fatal = await fake_api.wait_for(lambda b: b.get("fatal_error"), timeout=15, session_id="sess-c")
    assert fatal["fatal_error"].startswith(".orz/cloud.yaml:4: resources.memory:")
    for _ in range(100):
        status = await provider.status("sess-c", state)
        if status.phase != "running":
            break
        await asyncio.sleep(0.05)
    assert status.phase == "failed" and status.message and "resources.memory" in status.message
    assert process_start_time(state["pid"]) is None
    assert not (provider.session_dir("sess-c") / "state" / "tmux.sock").exists()
    assert "resources.memory" in await provider.read_log("sess-c", state)


async def test_after_a_fixed_config_starts_the_log_shows_this_run_not_the_earlier_failure(
        provider: LocalProvider, make_repo, fake_api: FakeApi, gateway_key, short_tmp: Path) -> None:
    """A broken .orz/cloud.yaml, fixed and pushed, then start --pull: `orz cloud logs` still showed the
    first run's fatal error under "== runner log ==", read as what is wrong now."""
    repo = make_repo({".orz/cloud.yaml": "version: '1.0'\nresources:\n  cpu: 2\n  memory: 4Gb\n"})
    spec = compute_spec("sess-r", fake_api, gateway_key, repo)
    state = await provider.create(spec)
    await fake_api.wait_for(lambda b: b.get("fatal_error"), timeout=15, session_id="sess-r")
    for _ in range(100):
        if (await provider.status("sess-r", state)).phase == "failed":
            break
        await asyncio.sleep(0.05)
    assert "resources.memory" in await provider.read_log("sess-r", state)

    src = short_tmp / Path(repo.removeprefix("file://")).name.replace("repo", "src").removesuffix(".git")
    (src / ".orz" / "cloud.yaml").write_text(CONFIG)
    runner_fixtures.git("commit", "--quiet", "-am", "fix", cwd=src)
    runner_fixtures.git("push", "--quiet", repo.removeprefix("file://"), "main", cwd=src)
    seen = len(fake_api.bodies("sess-r"))
    state2 = await provider.start(dataclasses.replace(spec, pull=True), state)
    await ready(fake_api, "sess-r", after=seen)
    shown = await provider.read_log("sess-r", state2)
    assert "resources.memory" not in shown and "fatal" not in shown
    assert "resources.memory" in (provider.session_dir("sess-r") / PREVIOUS_RUNNER_LOG).read_text()
    await provider.delete("sess-r", state2)
    await wait_gone(state2["pid"])


def test_process_start_time_of_this_process() -> None:
    assert process_start_time(os.getpid()) is not None
    assert process_start_time(2**22 + 12345) is None


async def test_runner_fast_path_off_reaches_the_runner(short_tmp: Path, make_repo, fake_api: FakeApi,
                                                       gateway_key) -> None:
    """runner_fast_path is set where the API runs; the provider passes it in the runner's environment
    (not the RunnerSpec, which older runner images would refuse) and the runner's endpoint heeds it."""
    settings = Settings(data_dir=short_tmp / "data", repo_file_dirs=str(short_tmp), runner_fast_path=False)
    async with local_provider(settings) as provider:
        state = await provider.create(compute_spec("sess-f", fake_api, gateway_key, make_repo({"README": "x\n"})))
        await ready(fake_api, "sess-f")
        environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
        assert b"ORZ_RUNNER_FAST_PATH=false" in environ
        # The operator's log (users' read_log shows only what concerns them).
        assert "fast path is off" in (provider.session_dir("sess-f") / RUNNER_LOG).read_text()
        await provider.delete("sess-f", state)
        await wait_gone(state["pid"])
