"""An exec into a container (probes, `kubectl exec`) gets the container's environment, runner token and
secrets included, without any of it on a command line: /proc/<pid>/cmdline is readable by every local user.
Real processes and nsenter (the rehearsal runs as root)."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rehearsal.kubelet import NSENTER, Container

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(os.geteuid() != 0, reason="nsenter into a process's namespaces needs root")]


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    """A 'container' whose PID 1 is a sleep of this host (its namespaces are the host's), holding a runner token
    and a secret in its environment as a session Pod's runner does."""
    holder = subprocess.Popen(["/bin/sh", "-c", "sleep 600 & wait"], start_new_session=True)
    env = {"ORZ_RUNNER_TOKEN": f"orzr_{secrets.token_urlsafe(24)}",
           "GITHUB_TOKEN": f"ghp_{secrets.token_urlsafe(24)}", "HOME": "/home/orz", "LANG": "C.UTF-8"}
    running = Container({"name": "runner"}, holder, tmp_path / "runner.log", env, os.getuid(), os.getgid())
    for _ in range(500):
        if running.init_pid() is not None:
            break
        time.sleep(0.01)
    try:
        yield running
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()


def processes() -> dict[int, tuple[bytes, bytes]]:
    """(cmdline, environ) of every process this test may read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = ((entry / "cmdline").read_bytes(), (entry / "environ").read_bytes())
            except OSError:
                continue
    return found


def test_no_secret_of_the_container_is_on_any_command_line_during_an_exec(container: Container,
                                                                          tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    done: list[subprocess.CompletedProcess[bytes] | None] = []
    # The command waits on the gate while the test reads every process's command line.
    execing = threading.Thread(target=lambda: done.append(container.exec(
        ["/bin/sh", "-c", f'read go < {gate}; printf "%s" "$ORZ_RUNNER_TOKEN"'], 30)))
    execing.start()
    try:
        for _ in range(3000):
            if any(str(gate).encode() in line for line, _ in processes().values()):
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the exec never started")
        seen = {pid: cmdline for pid, (cmdline, _) in processes().items()}
    finally:
        with gate.open("w") as opened:
            opened.write("go\n")
        execing.join(30)
    values = [v.encode() for k, v in container.env.items() if k.endswith("TOKEN")]
    leaks = {pid: line.replace(b"\0", b" ")[:200] for pid, line in seen.items() if any(v in line for v in values)}
    assert leaks == {}, leaks
    # ... and the command still had the token where the container has it.
    assert done and done[0] is not None and done[0].stdout.decode() == container.env["ORZ_RUNNER_TOKEN"], done


def test_an_exec_sees_exactly_the_containers_environment(container: Container) -> None:
    """Nothing of the kubelet's or its shell's (PATH, PWD, the cgroup list) comes along."""
    done = container.exec(["env"], 30)
    assert done is not None and done.returncode == 0, done
    assert sorted(done.stdout.decode().splitlines()) == sorted(f"{k}={v}" for k, v in container.env.items())
    with_path = Container(container.spec, container.process, container.log_path,
                          {**container.env, "PATH": "/usr/bin:/bin"}, container.uid, container.gid)
    done = with_path.exec(["env"], 30)
    assert done is not None and "PATH=/usr/bin:/bin" in done.stdout.decode().splitlines()


def test_the_host_side_of_an_exec_runs_without_the_containers_environment(container: Container,
                                                                          tmp_path: Path) -> None:
    """A container's env may name LD_PRELOAD (a service's env passes the API's checks): the host's root
    shell and nsenter, before they enter the container, must not load a library the session wrote."""
    planted = tmp_path / "emptydir" / "evil.so"
    planted.parent.mkdir()
    planted.write_bytes(b"not really a library")
    poisoned = Container(container.spec, container.process, container.log_path,
                         {**container.env, "LD_PRELOAD": str(planted), "GCONV_PATH": str(planted.parent)},
                         container.uid, container.gid)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    done: list[subprocess.CompletedProcess[bytes] | None] = []
    execing = threading.Thread(target=lambda: done.append(poisoned.exec(
        ["/bin/sh", "-c", f'read go < {gate}; printf "%s" "$LD_PRELOAD"'], 30)))
    execing.start()
    try:
        for _ in range(3000):
            if any(cmd.startswith(b"/bin/sh\0-c\0read go") for cmd, _ in processes().values()):
                break  # the command itself runs (it waits on the gate)
            time.sleep(0.01)
        else:
            raise AssertionError("the exec never started")
        seen = processes()
    finally:
        with gate.open("w") as opened:
            opened.write("go\n")
        execing.join(30)
    with_it = {pid: cmd for pid, (cmd, env) in seen.items() if str(planted).encode() in env}
    # The command's own environment only: not nsenter's, nor a shell's before it.
    assert with_it and all(cmd.startswith(b"/bin/sh\0-c\0read go") for cmd in with_it.values()), with_it
    assert any(cmd.startswith(NSENTER.encode()) for cmd, _ in seen.values())  # seen while nsenter was there
    assert done and done[0] is not None and done[0].stdout.decode() == str(planted), done
