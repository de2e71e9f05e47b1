"""`orz cloud watch`: a line per change, --json, and --notify through notify-send or the terminal bell."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.conftest import ROOT, LiveApi, Orz
from tests.cli.test_cloud_commands import create
from tests.conftest import Tenant


class Watch:
    def __init__(self, orz: Orz, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "cloud", "watch", "--interval", "0.2", *args],
                                     cwd=ROOT, env=orz.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buffer = b""

    def read_until(self, text: bytes, timeout: float = 15) -> bytes:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} in {self.buffer!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"watch exited: {self.proc.wait()} {self.proc.stderr.read()!r}"  # type: ignore[union-attr]
                self.buffer += chunk
        return self.buffer

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=10)  # and closes the pipes


@pytest.fixture
def watching(orz: Orz) -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        w.stop()


def test_watch_prints_each_change_and_notifies(orz: Orz, live_api: LiveApi, logged_in: Tenant, tmp_path: Path,
                                               watching: list[Watch]) -> None:
    sid = create(orz, cwd=tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "notify-calls"
    (bindir / "notify-send").write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {calls}\necho >> {calls}\n')
    (bindir / "notify-send").chmod(0o755)
    w = Watch(orz, "--notify", PATH=f"{bindir}:{os.environ['PATH']}")
    watching.append(w)
    w.read_until(f"{sid}  starting".encode())
    live_api.heartbeat(sid, agent_state="working")
    w.read_until(b"running, agent working")
    live_api.heartbeat(sid, agent_state="needs_input", agent_message="approve the migration?")
    w.read_until(b"running, agent needs input: approve the migration?")
    deadline = time.monotonic() + 5
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert calls.read_text().splitlines() == [f"--app-name=orz|--|orz: {sid} needs input|approve the migration?|"]
    # The agent's words are the body even when they read like an option of notify-send's.
    live_api.heartbeat(sid, agent_state="idle", agent_message="--urgency=critical")
    w.read_until(b"running, agent idle: --urgency=critical")
    deadline = time.monotonic() + 5
    while len(calls.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert calls.read_text().splitlines()[1] == f"--app-name=orz|--|orz: {sid} idle|--urgency=critical|"
    # ... and text, not markup for the notification daemon: no link to click, no local file to show.
    live_api.heartbeat(sid, agent_state="needs_input", agent_message='<a href="https://x.example">ok</a> & <img src="file:///etc/passwd">')
    w.read_until(b"needs input: <a href")
    deadline = time.monotonic() + 5
    while len(calls.read_text().splitlines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert calls.read_text().splitlines()[2] == (f"--app-name=orz|--|orz: {sid} needs input|&lt;a "
                                                 'href="https://x.example"&gt;ok&lt;/a&gt; &amp; &lt;img '
                                                 'src="file:///etc/passwd"&gt;|')


def test_watch_rings_the_bell_without_notify_send_and_speaks_json(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                                   tmp_path: Path, watching: list[Watch]) -> None:
    sid = create(orz, cwd=tmp_path)
    other = create(orz, cwd=tmp_path)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "notify-send").exists())
    w = Watch(orz, sid, "--notify", "--json", PATH=path)
    watching.append(w)
    first = json.loads(w.read_until(b"\n").splitlines()[0])
    assert first["id"] == sid and first["status"] == "starting" and first["agent_state"] is None
    live_api.heartbeat(other, agent_state="idle")  # not watched
    live_api.heartbeat(sid, agent_state="exited", agent_exit_code=3)
    out = w.read_until(b"\x07")
    lines = [json.loads(line) for line in out.replace(b"\x07", b"").splitlines() if line.strip()]
    assert {line["id"] for line in lines} == {sid}
    assert lines[-1]["agent_state"] == "exited" and lines[-1]["agent_exit_code"] == 3


def test_watch_of_an_id_that_is_no_session_says_so(orz: Orz, live_api: LiveApi, logged_in: Tenant,
                                                   tmp_path: Path) -> None:
    sid = create(orz, cwd=tmp_path)
    done = orz("cloud", "watch", "--interval", "0.2", sid, "nosuch-1")  # a typo printed nothing, for ever
    assert done.returncode == 3, done
    assert done.stderr.strip() == "orz: no such session: nosuch-1"
