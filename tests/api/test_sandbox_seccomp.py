"""The sessions' system-call filter: refused where it has no table for the CPU, and its memfd never leaked."""

from __future__ import annotations

import asyncio
import json
import os
import platform
from pathlib import Path

import pytest

from api.instances.providers import sandbox, sandbox_launch


@pytest.mark.parametrize("machine", ["riscv64", "ppc64le", "s390x", "loongarch64"])
def test_a_cpu_without_a_filter_table_is_refused_by_name(machine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The filter answers ENOSYS for every system call of an ABI it has no table for: execve included, so
    no session could start, with a "Function not implemented" that says nothing of why."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    with pytest.raises(sandbox.SandboxUnavailable, match=machine):
        sandbox.find_tools()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="a CPU the filter has a table for")
def test_this_cpu_has_a_table() -> None:
    sandbox.check_architecture()


def seccomp_fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "orz-seccomp" in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(fd)
        except OSError:
            continue
    return found


def test_the_filters_memfd_is_closed_when_bwrap_cannot_be_started(tmp_path: Path) -> None:
    plan = sandbox.launcher_plan(
        bwrap=[str(tmp_path / "no-such-bwrap")], command=["true"],
        tools=sandbox.Tools(bwrap="bwrap", slirp4netns="slirp4netns"), relay_ports=[], cgroup_name=None,
        limits={}, paths=sandbox.SessionPaths(tmp_path / "s"), session_id="s-1")
    assert plan["seccomp"]
    before = seccomp_fds()
    with pytest.raises(FileNotFoundError):
        asyncio.run(sandbox_launch.run(json.loads(json.dumps(plan))))
    assert seccomp_fds() == before
