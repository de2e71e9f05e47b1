"""One rehearsal per machine: a second RehearsalCluster waits for the first's lock before it touches the
network (the bridge and addresses are fixed, so two at once would tear each other down)."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from rehearsal import cluster as cluster_module
from rehearsal.cluster import RehearsalCluster


def test_a_second_rehearsal_waits_for_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    lock_path = tmp_path / "rehearsal.lock"
    monkeypatch.setattr(cluster_module, "MACHINE_LOCK", lock_path)
    first = lock_path.open("ab")
    fcntl.flock(first, fcntl.LOCK_EX)  # the first rehearsal, running
    second = RehearsalCluster(tmp_path / "work", helm=Path("/bin/false"))
    took = threading.Event()
    waiter = threading.Thread(target=lambda: (second._take_machine(), took.set()), daemon=True)
    waiter.start()
    assert not took.wait(0.5)  # still waiting while the first holds the machine
    first.close()
    assert took.wait(10)
    waiter.join(5)
    assert "another rehearsal holds" in capsys.readouterr().out
    second._release_machine()  # as close() does: the next one takes it at once
    third = RehearsalCluster(tmp_path / "work", helm=Path("/bin/false"))
    third._take_machine()
    third._release_machine()
