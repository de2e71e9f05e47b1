"""Fixtures for runner tests: bare git repos, the gateway's key, a fake heartbeat API, in-process runners."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from api.schemas import RunnerSpec
from runner.main import Runner
from runner.tmux import Tmux
from tests.runner.fake_api import FakeApi

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}
HI_PROGRAM = "bash -c 'echo hi; sleep infinity'"


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
async def tmux(short_tmp: Path) -> AsyncIterator[Tmux]:
    """A tmux server of its own on a short socket path, killed after the test."""
    t = Tmux(short_tmp / "tmux.sock")
    try:
        yield t
    finally:
        await t.kill_server()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short /tmp dir (unix socket paths are limited to ~100 bytes), searchable by other users."""
    path = Path(tempfile.mkdtemp(prefix="orz-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


MakeRepo = Callable[..., str]


async def wait_for_pane(tmux: Tmux, text: str, timeout: float = 5.0) -> str:
    """The pane's screen once ``text`` is on it; fails, showing the screen, after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.1)):
        screen = await tmux.capture()
        if text in screen:
            return screen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not in pane: {screen!r}")


@pytest.fixture
def make_repo(short_tmp: Path) -> MakeRepo:
    """``make_repo({"path": "text"}, branch="main", extra_branches={...})`` → a file:// URL of a bare repo."""
    counter = iter(range(1000))

    def make(files: dict[str, str], branch: str = "main",
             extra_branches: dict[str, dict[str, str]] | None = None) -> str:
        n = next(counter)
        bare, src = short_tmp / f"repo{n}.git", short_tmp / f"src{n}"
        git("init", "--quiet", "--bare", "-b", branch, str(bare))
        git("init", "--quiet", "-b", branch, str(src))
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        git("add", "-A", cwd=src)
        git("commit", "--quiet", "-m", "first", "--allow-empty", cwd=src)
        git("commit", "--quiet", "-m", "second", "--allow-empty", cwd=src)
        git("push", "--quiet", str(bare), branch, cwd=src)
        for other, other_files in (extra_branches or {}).items():
            git("checkout", "--quiet", "-b", other, cwd=src)
            for rel, text in other_files.items():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                (src / rel).write_text(text)
            git("add", "-A", cwd=src)
            git("commit", "--quiet", "-m", f"on {other}", cwd=src)
            git("push", "--quiet", str(bare), other, cwd=src)
            git("checkout", "--quiet", branch, cwd=src)
        return f"file://{bare}"

    return make


@dataclass
class GatewayKey:
    private: asyncssh.SSHKey
    public: str


@pytest.fixture(scope="session")
def gateway_key() -> GatewayKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return GatewayKey(key, key.export_public_key().decode().strip())


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    api = await FakeApi().start()
    try:
        yield api
    finally:
        await api.close()


@dataclass
class RunningRunner:
    runner: Runner
    stop: asyncio.Event
    task: asyncio.Task[int]
    api: FakeApi
    gateway: GatewayKey

    @property
    def spec(self) -> RunnerSpec:
        return self.runner.spec

    async def ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait for the heartbeat that says the endpoint is up and the program runs."""
        waiter = asyncio.create_task(self.api.wait_for(
            lambda b: b.get("ssh_port") and b.get("program_running"), timeout))
        done, _ = await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            fatal = self.runner.activity.fatal_error
            raise AssertionError(f"runner exited with {self.task.result()}: {fatal}")
        return waiter.result()

    async def connect(self, username: str = "rw", key: asyncssh.SSHKey | None = None,
                      **kwargs: Any) -> asyncssh.SSHClientConnection:
        activity = self.runner.activity
        assert activity.ssh_port and activity.host_key
        host_key = asyncssh.import_public_key(activity.host_key)
        return await asyncssh.connect(
            "127.0.0.1", activity.ssh_port, username=username,
            client_keys=[key or self.gateway.private], known_hosts=([host_key], [], []),
            encoding=None, agent_path=None, **kwargs,
        )

    async def finish(self, timeout: float = 15.0) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, timeout)


StartRunner = Callable[..., Any]


@pytest.fixture
async def start_runner(short_tmp: Path, fake_api: FakeApi, gateway_key: GatewayKey
                       ) -> AsyncIterator[StartRunner]:
    """Start runners in this process (real git, tmux, asyncssh) and always tear them down."""
    started: list[RunningRunner] = []

    async def start(repo_url: str | None = None, *, branch: str | None = "main",
                    program: str | None = HI_PROGRAM, task: str | None = None,
                    secrets: dict[str, str] | None = None, name: str = "s1",
                    extra_env: dict[str, str] | None = None, fast_path: bool = True,
                    **spec_fields: Any) -> RunningRunner:
        base = short_tmp / name
        spec = RunnerSpec(
            session_id=name, api_url=fake_api.url, repo_url=repo_url, branch=branch, program=program,
            task=task, gateway_public_key=gateway_key.public,
            secret_env=sorted(secrets or {}), workspace=str(base / "workspace"),
            state_dir=str(base / "state"), **{"heartbeat_interval_s": 1, **spec_fields},
        )
        environ = {"PATH": os.environ["PATH"], "HOME": str(short_tmp), "LANG": "C.UTF-8",
                   **(secrets or {}), **(extra_env or {})}
        fake_api.expect(name, "runner-token-1")
        runner = Runner(spec, "runner-token-1", environ, fast_path=fast_path)
        stop = asyncio.Event()
        handle = RunningRunner(runner, stop, asyncio.create_task(runner.run(stop)), fake_api, gateway_key)
        started.append(handle)
        return handle

    try:
        yield start
    finally:
        # A runner that crashes or hangs on stop is a failure of the test, reported after every runner
        # is cleaned up (a test that cancelled its runner on purpose is the one exception).
        problems = []
        for handle in started:
            handle.stop.set()
            if not handle.task.cancelled():
                try:
                    await asyncio.wait_for(handle.task, 20)
                except Exception as exc:  # collected, then failed on below
                    problems.append(f"runner {handle.spec.session_id} did not stop cleanly: {exc!r}")
            # Whatever happened above, no tmux server outlives the test.
            subprocess.run(["tmux", "-S", str(handle.runner.tmux.socket), "kill-server"],
                           capture_output=True, check=False)
        if problems:
            pytest.fail("; ".join(problems))
