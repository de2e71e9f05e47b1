"""`orz server` with the local provider: real API, real runners, real git and tmux, over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.instances.providers.local import process_start_time
from tests.runner import conftest as runner_fixtures
from tests.support import ROOT, free_port, orz_env, stop_process, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

short_tmp = runner_fixtures.short_tmp
make_repo = runner_fixtures.make_repo


class Server:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.api_port = free_port()
        env = orz_env(tmp / "home", ORZ_PROVIDER="local", ORZ_HEARTBEAT_INTERVAL_S="2")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "server", "--api-port", str(self.api_port), "--ssh-port",
             str(free_port()), "--web-port", "0", "--data-dir", str(tmp / "data")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        token_file = tmp / "home" / ".config" / "orzbob" / "token.json"
        wait_until(lambda: token_file.exists() or self.proc.poll() is not None, timeout=60, what="orz server")
        assert self.proc.poll() is None, self.proc.communicate()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=30, headers={
            "Authorization": f"Bearer {json.loads(token_file.read_text())['api_token']}"})

    def get(self, sid: str) -> dict[str, Any]:
        return self.http.get(f"/v1/instances/{sid}").json()

    def wait_status(self, sid: str, *states: str, timeout: float = 30) -> dict[str, Any]:
        wait_until(lambda: self.get(sid)["status"] in states, timeout=timeout, what=f"{sid} in {states}")
        return self.get(sid)

    def stop(self) -> tuple[str, str]:
        self.http.close()
        return stop_process(self.proc)


@pytest.fixture
def server(short_tmp: Path) -> Iterator[Server]:
    srv = Server(short_tmp)
    try:
        yield srv
    finally:
        srv.stop()
        # Anything a failing test left: runners are in their own process groups, so stop them by pid.
        for pid_file in (short_tmp / "data" / "sessions").glob("*/provider.json"):
            saved = json.loads(pid_file.read_text())
            # only a process that is still the runner we started (same start time), never a reused pid
            if saved.get("pid") and process_start_time(saved["pid"]) == saved.get("start_time"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(saved["pid"], signal.SIGKILL)
            sock = pid_file.parent / "state" / "tmux.sock"
            subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True, check=False)


def test_session_lifecycle_through_the_api(server: Server, make_repo) -> None:
    repo = make_repo({".orz/cloud.yaml": 'version: "1.0"\nsetup:\n  init: echo ran >> runs.txt; echo init-out\n'})
    created = server.http.post("/v1/instances", json={
        "repo_url": repo, "branch": "main", "program": runner_fixtures.HI_PROGRAM})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    running = server.wait_status(sid, "running", "failed")
    assert running["status"] == "running", running
    logs = server.http.get(f"/v1/instances/{sid}/logs").json()
    assert "init-out" in logs["init_log"]

    assert server.http.post(f"/v1/instances/{sid}/stop").status_code == 200
    server.wait_status(sid, "stopped")
    assert server.http.post(f"/v1/instances/{sid}/start").status_code == 200
    assert server.wait_status(sid, "running", "failed")["status"] == "running"
    workspace = server.tmp / "data" / "sessions" / sid / "workspace"
    assert (workspace / "runs.txt").read_text() == "ran\n"

    # runs.txt is uncommitted work: the delete says it means it
    assert server.http.delete(f"/v1/instances/{sid}", params={"force": "true"}).status_code in (200, 202)
    wait_until(lambda: not workspace.parent.exists(), timeout=20, what="session dir removed")


def test_bad_cloud_yaml_fails_the_session_with_path_and_line(server: Server, make_repo) -> None:
    repo = make_repo({".orz/cloud.yaml": "version: '1.0'\nservices:\n  db:\n    image: postgres\n"
                                         "    health:\n      command: x\n      retries: lots\n"})
    sid = server.http.post("/v1/instances", json={"repo_url": repo, "branch": "main"}).json()["id"]
    failed = server.wait_status(sid, "failed", "running")
    assert failed["status"] == "failed"
    assert failed["reason"].startswith(".orz/cloud.yaml:7: services.db.health.retries:")
    # the API still answers promptly, and nothing of the session keeps running
    assert server.http.get("/v1/instances").status_code == 200
    pid = json.loads((server.tmp / "data" / "sessions" / sid / "provider.json").read_text())["pid"]
    # gone or a zombie (process_start_time says None for both, and does not trip over an exit meanwhile)
    wait_until(lambda: process_start_time(pid) is None, timeout=10, what="runner exit")


def _fds(pid: int) -> dict[int, tuple[str, bool]]:
    """Each open fd of ``pid``: what it points at, and whether a child would inherit it (no O_CLOEXEC)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            flags = next(line for line in Path(f"/proc/{pid}/fdinfo/{name}").read_text().splitlines()
                         if line.startswith("flags:"))
            out[int(name)] = (target, not int(flags.split()[1], 8) & os.O_CLOEXEC)
    return out


def _session_processes(session_dir: Path, leader: int) -> dict[int, str]:
    """pid -> command line of the session's runner (or sandbox launcher), everything below it, and the
    daemonized tmux server and its panes' programs (reparented away from the runner without the sandbox)."""
    parent, cmdline = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                cmdline[int(entry.name)] = b" ".join(argv).decode("utf-8", "replace")
    roots = {leader} | {pid for pid, cmd in cmdline.items() if str(session_dir) in cmd and "tmux" in cmd}
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child, ppid in parent.items() if ppid == pid]
    return {pid: cmdline.get(pid, "?") for pid in found if pid in cmdline}


def test_session_processes_inherit_no_descriptor_of_the_server(server: Server, make_repo) -> None:
    """`orz server` runs on uvloop (libuv makes its own pipes and sockets) and starts runners with
    posix_spawn, the sandbox launcher its children with pass_fds: no socket or pipe of the server may
    reach a session's runner, tmux or program, and our own processes hold nothing inheritable beyond
    stdio, so a later spawn cannot hand one on either."""
    sid = server.http.post("/v1/instances", json={"repo_url": make_repo({"README": "x\n"}), "branch": "main",
                                                  "program": runner_fixtures.HI_PROGRAM}).json()["id"]
    assert server.wait_status(sid, "running", "failed")["status"] == "running"
    session_dir = server.tmp / "data" / "sessions" / sid
    leader = json.loads((session_dir / "provider.json").read_text())["pid"]
    processes = _session_processes(session_dir, leader)
    assert any("sleep infinity" in cmd for cmd in processes.values()), processes  # the program is among them

    served = _fds(server.proc.pid)
    assert {fd for fd, (_, inheritable) in served.items() if inheritable} <= {0, 1, 2}, served
    # Sockets and pipes are named by inode: the same name in a session's process is the server's own.
    ours = {target for target, _ in served.values() if target.startswith(("socket:", "pipe:"))}
    checked = set()
    for pid, cmd in processes.items():
        try:
            fds = _fds(pid)
        except FileNotFoundError:  # a short-lived child (the runner's git of a workspace scan) ended meanwhile
            continue
        checked.add(pid)
        assert not ours & {target for target, _ in fds.values()}, (cmd, fds)
        if Path(cmd.split(" ", 1)[0]).name not in ("tmux", "bwrap", "slirp4netns"):  # theirs, not ours
            assert {fd for fd, (_, inheritable) in fds.items() if inheritable and fd > 2} == set(), (cmd, fds)
    # the long-lived ones were looked at: the runner (or launcher) and the program
    assert leader in checked, (leader, processes)
    assert any("sleep infinity" in processes[pid] for pid in checked), processes
