"""The pane's recording with a real tmux: what the program prints lands in an asciicast v2 file with
rising times, resizes are noted, the size cap rotates parts, and a new runner appends to the last part."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from api.schemas import RECORDING_MIN_BYTES, STATE_RECORDING, STATE_RECORDING_PREVIOUS
from runner.program import program_argv
from runner.recording import PART_FILE, CastFile, Recorder
from runner.tmux import Tmux

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]
ENV = {"PATH": os.environ["PATH"], "HOME": "/tmp", "LANG": "C.UTF-8"}


def read_cast(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    header, *events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return header, events


def output_of(events: list[list[Any]]) -> str:
    return "".join(e[2] for e in events if e[1] == "o")


async def wait_cast(path: Path, text: str, timeout: float = 10.0) -> list[list[Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if path.exists():
            _, events = read_cast(path)
            if text in output_of(events):
                return events
        assert loop.time() < deadline, f"{text!r} not recorded in {path}"
        await asyncio.sleep(0.1)


async def record(tmux: Tmux, directory: Path, program: str, max_bytes: int = 1 << 20) -> Recorder:
    recorder = Recorder(tmux, directory, max_bytes)
    await recorder.start(Tmux.WIDTH, Tmux.HEIGHT)
    started = await tmux.ensure(program_argv(program, None, "/bin/bash"), cwd=directory, env=ENV)
    await recorder.pane_ready(started is not None)
    return recorder


async def test_what_the_program_prints_is_recorded_with_rising_times(tmux: Tmux, short_tmp: Path) -> None:
    # Printed at once: the pipe must be there from the program's first byte.
    program = "bash -c 'echo first-line-42; sleep 0.3; printf \"caf\\303\\251 second\\n\"; sleep infinity'"
    recorder = await record(tmux, short_tmp, program)
    try:
        events = await wait_cast(short_tmp / STATE_RECORDING, "café second")
    finally:
        await recorder.stop()
    header, events = read_cast(short_tmp / STATE_RECORDING)
    assert header["version"] == 2 and header["width"] == Tmux.WIDTH and header["height"] == Tmux.HEIGHT
    assert isinstance(header["timestamp"], int) and abs(header["timestamp"] - time.time()) < 30
    text = output_of(events)
    assert text.index("first-line-42") < text.index("café second")
    times = [e[0] for e in events]
    assert times == sorted(times) and times[-1] - times[0] >= 0.25  # the 0.3 s pause is in the timing
    assert (short_tmp / STATE_RECORDING).stat().st_mode & 0o777 == 0o600
    assert not (short_tmp / "recording.fifo").exists()


async def test_a_resize_is_an_r_event_and_a_respawned_program_is_still_recorded(tmux: Tmux, short_tmp: Path) -> None:
    recorder = await record(tmux, short_tmp, "bash -c 'echo one; exit 3'")
    try:
        await wait_cast(short_tmp / STATE_RECORDING, "one")
        await tmux.run("resize-window", "-t", "main", "-x", "90", "-y", "25")
        for _ in range(50):
            _, events = read_cast(short_tmp / STATE_RECORDING)
            if ["r", "90x25"] in [e[1:] for e in events]:
                break
            await asyncio.sleep(0.1)
        assert ["r", "90x25"] in [e[1:] for e in events]
        for _ in range(50):  # the program's exit is seen, then an attach restarts it
            if (await tmux.pane_state()).dead:
                break
            await asyncio.sleep(0.1)
        again = await tmux.ensure(program_argv("bash -c 'echo two; sleep infinity'", None, "/bin/bash"),
                                  cwd=short_tmp, env=ENV)
        assert again == "restarted"
        await wait_cast(short_tmp / STATE_RECORDING, "two")
    finally:
        await recorder.stop()


async def test_the_cap_rotates_parts_and_keeps_only_the_previous_one(tmux: Tmux, short_tmp: Path) -> None:
    cap = RECORDING_MIN_BYTES
    # About 5 caps of output, in numbered lines: the end must be in the current part, the lines just
    # before it in the previous one, and the beginning nowhere.
    program = ("bash -c 'for i in $(seq 1 4000); do echo line-$i-" + "x" * 45 + "; done; "
               "echo done-all; sleep infinity'")
    recorder = await record(tmux, short_tmp, program, max_bytes=cap)
    try:
        await wait_cast(short_tmp / STATE_RECORDING, "done-all", timeout=20)
    finally:
        await recorder.stop()
    current, previous = short_tmp / STATE_RECORDING, short_tmp / STATE_RECORDING_PREVIOUS
    assert current.stat().st_size <= cap and previous.stat().st_size <= cap
    for part in (current, previous):
        header, events = read_cast(part)
        assert header["version"] == 2 and events
    assert "line-1-x" not in output_of(read_cast(previous)[1]) + output_of(read_cast(current)[1])
    assert "line-3999-" in output_of(read_cast(previous)[1]) + output_of(read_cast(current)[1])
    assert sorted(p.name for p in short_tmp.glob("*.cast")) == [STATE_RECORDING_PREVIOUS, STATE_RECORDING]


async def test_a_new_runner_appends_to_the_last_part_with_later_times(short_tmp: Path) -> None:
    first = Tmux(short_tmp / "a.sock")
    recorder = await record(first, short_tmp, "bash -c 'echo before-stop; sleep infinity'")
    try:
        await wait_cast(short_tmp / STATE_RECORDING, "before-stop")
    finally:
        await first.kill_server()
        await recorder.stop()
    header_before, events_before = read_cast(short_tmp / STATE_RECORDING)
    second = Tmux(short_tmp / "b.sock")
    recorder = await record(second, short_tmp, "bash -c 'echo after-wake; sleep infinity'")
    try:
        await wait_cast(short_tmp / STATE_RECORDING, "after-wake")
    finally:
        await second.kill_server()
        await recorder.stop()
    header, events = read_cast(short_tmp / STATE_RECORDING)
    assert header == header_before and events[:len(events_before)] == events_before
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert output_of(events).index("before-stop") < output_of(events).index("after-wake")
    assert not (short_tmp / STATE_RECORDING_PREVIOUS).exists()


def test_a_part_cut_off_mid_line_is_kept_aside_and_a_new_one_started(short_tmp: Path) -> None:
    path = short_tmp / STATE_RECORDING
    path.write_text('{"version": 2, "width": 80, "height": 24, "timestamp": 1}\n[0.5, "o", "hal', encoding="utf-8")
    cast = CastFile(short_tmp, RECORDING_MIN_BYTES, clock=lambda: 1000.0)
    cast.open(80, 24)
    cast.output("fresh")
    cast.close()
    assert read_cast(path) == ({"version": 2, "width": 80, "height": 24, "timestamp": 1000,
                                "env": {"TERM": "xterm-256color"}}, [[0.0, "o", "fresh"]])
    assert (short_tmp / STATE_RECORDING_PREVIOUS).read_text(encoding="utf-8").endswith('"hal')


def test_each_part_has_a_name_that_a_new_runner_keeps_and_a_part_without_it_is_not_continued(
        short_tmp: Path) -> None:
    """The name is what the API knows the part by (runner.recording.Uploader): the same file, the same name."""
    def cast_file() -> CastFile:
        cast = CastFile(short_tmp, RECORDING_MIN_BYTES, clock=lambda: 1000.0)
        cast.open(80, 24)
        return cast

    first = cast_file()
    first.output("one")
    name = first.part_id
    first.close()
    assert (short_tmp / PART_FILE).read_text().strip() == name
    again = cast_file()  # the runner started again on the same files (a wake on the local provider)
    assert again.part_id == name
    again.output("two")
    again.close()
    (short_tmp / PART_FILE).unlink()
    third = cast_file()  # the name is gone: this file cannot be continued upstream, a new part starts
    assert third.part_id not in ("", name) and third.previous_id == ""
    assert output_of(read_cast(short_tmp / STATE_RECORDING_PREVIOUS)[1]) == "onetwo"
    for _ in range(RECORDING_MIN_BYTES // 1000 + 1):  # past the cap: rotated, the name moves along
        third.output("x" * 1000)
    third.close()
    assert third.previous_id != "" and third.part_id not in ("", third.previous_id)
    assert (short_tmp / PART_FILE).read_text().strip() == third.part_id


async def test_attaching_and_detaching_a_terminal_keeps_the_recording_going(tmux: Tmux, short_tmp: Path) -> None:
    import pexpect

    program = "bash -c 'for i in $(seq 1 100); do echo tick-$i; sleep 0.1; done; sleep infinity'"
    recorder = await record(tmux, short_tmp, program)
    client = pexpect.spawn(tmux.binary, ["-S", str(tmux.socket), "attach-session", "-t", "main"],
                           dimensions=(30, 100), env={**ENV, "TERM": "xterm"}, timeout=10)
    try:
        await asyncio.to_thread(client.expect, "tick-")
        await wait_cast(short_tmp / STATE_RECORDING, "tick-5")
        for _ in range(50):  # tmux sizes the window to the client (the status line takes a row)
            _, events = read_cast(short_tmp / STATE_RECORDING)
            if any(e[1] == "r" and e[2].startswith("100x") for e in events):
                break
            await asyncio.sleep(0.1)
        assert any(e[1] == "r" and e[2].startswith("100x") for e in events), events
        client.sendcontrol("b")
        client.send("d")
        await asyncio.to_thread(client.expect, pexpect.EOF)
        events = await wait_cast(short_tmp / STATE_RECORDING, "tick-100", timeout=20)
    finally:
        client.close(force=True)
        await recorder.stop()
    text = output_of(events)
    assert all(f"tick-{i}\r\n" in text for i in range(1, 101))  # nothing lost while a client came and went
