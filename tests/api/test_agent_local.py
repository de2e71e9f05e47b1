"""Agent-aware sessions on the local provider: real API, runner processes, tmux and git with a bare origin."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from api import schemas
from api.credentials.secrets_box import SecretsBox
from api.errors import UnsavedWork
from api.instances.event_budget import WORK_NOT_PUSHED_KIND
from api.webhooks.service import WebhookService
from tests.api.test_lifecycle_local import Stack, gateway_key, make_repo, short_tmp, stack  # noqa: F401
from tests.runner import conftest as runner_fixtures
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def wait_row(on: Stack, sid: str, predicate, timeout: float = 30):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = await on.row(sid)
        if predicate(row):
            return row
        assert loop.time() < deadline, f"{sid}: agent {row.agent_state} ({row.agent_message}), work {row.work}"
        await asyncio.sleep(0.2)


# Sandboxed runners see a file:// origin read-only (only the sandbox off lets them push to one); the
# helper and the agent state work in both.
@pytest.mark.parametrize("stack", ["off", "on"], indirect=True)
async def test_needs_input_reaches_the_api_and_delete_pushes_the_work_first(stack: Stack, make_repo) -> None:  # noqa: F811
    repo = make_repo({"README": "hello\n"})
    program = ("bash -c 'echo draft > plan.md; "
               "orz-session state needs-input --message \"which database?\"; read answer; sleep infinity'")
    created = await stack.service.create(stack.who, schemas.InstanceCreate(repo_url=repo, branch="main",
                                                                           program=program))
    await stack.wait_state(created.id, "running")
    row = await wait_row(stack, created.id, lambda r: r.agent_state == "needs_input")
    assert row.agent_message == "which database?"
    events = [(e.kind, e.to_state, e.message) for e in await stack.events(created.id) if e.kind == "agent"]
    assert ("agent", "needs_input", "needs_input: which database?") in events

    await wait_row(stack, created.id, lambda r: bool(r.work and r.work.get("dirty_files")))
    with pytest.raises(UnsavedWork):  # plan.md is on no branch yet
        await stack.service.delete(stack.who, created.id)
    await stack.service.delete(stack.who, created.id, force=True)  # and forced, it is pushed before it goes
    if stack.settings.sandbox == "on":
        return
    bare = Path(repo.removeprefix("file://"))
    shown = subprocess.run(["git", "show", f"orz/{created.id}:plan.md"], cwd=bare, capture_output=True, text=True,
                           check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "draft\n"
    assert not stack.provider.session_dir(created.id).exists()


@pytest.mark.parametrize("stack", ["off", "on"], indirect=True)
async def test_the_reaper_stop_pushes_the_work_and_reports_it(stack: Stack, make_repo) -> None:  # noqa: F811
    repo = make_repo({"README": "hello\n"})
    created = await stack.service.create(stack.who, schemas.InstanceCreate(
        repo_url=repo, branch="main", program=runner_fixtures.HI_PROGRAM))
    await stack.wait_state(created.id, "running")
    workspace = stack.provider.session_dir(created.id) / "workspace"
    (workspace / "README").write_text("edited\n")
    await stack.service.stop_instance(await stack.row(created.id), "scheduler", "idle")
    row = await stack.row(created.id)
    assert row.state == "stopped"
    assert row.work and row.work["dirty_files"] == 1, row.work
    if stack.settings.sandbox == "on":  # the origin is read-only in the sandbox: said, and kill will refuse
        assert "Read-only file system" in row.work["wip_error"] and row.work["wip_branch"] is None
        # ... and `orz cloud status` shows it among the events, once, in one line (not only in runner.log).
        failed = [e for e in await stack.events(created.id) if e.kind == WORK_NOT_PUSHED_KIND]
        assert len(failed) == 1 and failed[0].actor == "runner", failed
        assert failed[0].message.startswith(f"could not push the session's work to orz/{created.id}: ")
        assert "Read-only file system" in failed[0].message and "\n" not in failed[0].message
        return
    assert row.work.get("wip_error") is None and row.work["wip_branch"] == f"orz/{created.id}", row.work
    assert not [e for e in await stack.events(created.id) if e.kind == WORK_NOT_PUSHED_KIND]
    bare = Path(repo.removeprefix("file://"))
    assert subprocess.run(["git", "show", f"orz/{created.id}:README"], cwd=bare, capture_output=True, text=True,
                          check=True).stdout == "edited\n"
    assert (workspace / "README").read_text() == "edited\n"  # the kept workspace is untouched


async def test_a_program_asking_for_input_reaches_the_users_webhook_signed(stack: Stack, make_repo) -> None:  # noqa: F811
    """A real session (runner, tmux, the orz-session helper) to a real receiver, sent by the scheduler's sender."""
    repo = make_repo({"README": "hello\n"})
    allowed = stack.settings.model_copy(update={"webhook_allow_hosts": "127.0.0.1", "webhook_poll_s": 0.2})
    sender = stack.sched.deliverer
    sender.settings = allowed
    box = SecretsBox.from_settings(allowed)
    receiver = Receiver().start()
    try:
        hooks = WebhookService(allowed, stack.service.db_sessions, box, sender)
        created = await hooks.create(stack.who, schemas.WebhookCreate(url=receiver.url, format="slack"))
        receiver.secret = created.secret
        sender.start()  # what LifecycleScheduler.start does on every scheduler replica
        session = await stack.service.create(stack.who, schemas.InstanceCreate(
            repo_url=repo, branch="main",
            program="bash -c 'orz-session state needs-input --message hi; read answer; sleep infinity'"))
        await stack.wait_state(session.id, "running")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not receiver.got:
            assert loop.time() < deadline, "no delivery reached the receiver"
            await asyncio.sleep(0.2)
    finally:
        receiver.stop()
    [got] = receiver.got
    assert got.verified and got.headers["x-orz-event"] == "agent.needs_input"
    assert got.json == {"text": f"Session {session.id} ({Path(repo).name.removesuffix('.git')}@main) needs your "
                                f"input: hi\norz cloud attach {session.id}"}


# The agent writes only when told (the trigger and its answer live in .git, which git status ignores), so the
# write lands well inside the 15 s between the runner's periodic scans.
LATE_WRITER = ("bash -c 'until [ -e .git/orz-test-go ]; do sleep 0.05; done; echo late > late.txt; "
               "touch .git/orz-test-written; sleep infinity'")


@pytest.mark.parametrize("stack", ["on", "off"], indirect=True)
async def test_a_delete_right_after_the_agent_wrote_sees_the_file(stack: Stack, make_repo) -> None:  # noqa: F811
    repo = make_repo({"README": "hello\n"})
    created = await stack.service.create(stack.who, schemas.InstanceCreate(repo_url=repo, branch="main",
                                                                           program=LATE_WRITER))
    await stack.wait_state(created.id, "running")
    await wait_row(stack, created.id, lambda r: r.work is not None and r.work["dirty_files"] == 0)
    git_dir = stack.provider.session_dir(created.id) / "workspace" / ".git"
    (git_dir / "orz-test-go").touch()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (git_dir / "orz-test-written").exists():
        assert loop.time() < deadline, "the program did not write"
        await asyncio.sleep(0.02)
    assert (await stack.row(created.id)).work["dirty_files"] == 0  # the runner has not seen it yet

    if stack.settings.sandbox == "off":
        # The runner pushes what it finds as it stops: nothing is lost, and the delete goes through.
        deleted = await stack.service.delete(stack.who, created.id)
        assert deleted.state == "deleted"
        bare = Path(repo.removeprefix("file://"))
        assert subprocess.run(["git", "show", f"orz/{created.id}:late.txt"], cwd=bare, capture_output=True,
                              text=True, check=True).stdout == "late\n"
        return
    # Sandboxed, the file:// origin is read-only: the push fails, so the delete is refused and names the file.
    with pytest.raises(UnsavedWork) as refused:
        await stack.service.delete(stack.who, created.id)
    assert refused.value.extra["work"]["files"] == ["late.txt"], refused.value.extra
    assert "1 uncommitted file (late.txt)" in refused.value.detail
    assert "it was stopped to read this and its workspace is kept" in refused.value.detail
    row = await stack.row(created.id)
    assert row.state == "stopped" and (git_dir.parent / "late.txt").read_text() == "late\n"
    await stack.service.delete(stack.who, created.id, force=True)
    assert not stack.provider.session_dir(created.id).exists()
