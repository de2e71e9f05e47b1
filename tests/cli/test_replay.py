"""`orz cloud replay`'s timing (pure) and `orz admin set-recording` (a real database, the real command)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from cli.cloud_replay import Cast, parse_cast, play, schedule
from cli.errors import CliError

CAST = (b'{"version": 2, "width": 80, "height": 24, "timestamp": 1700000000}\n'
        b'[0.5, "o", "one "]\n[0.6, "r", "100x30"]\n[3.5, "o", "two "]\n[603.5, "o", "three"]\n'
        b'[604.0, "o", "cut off')


def test_a_recording_is_parsed_without_the_line_cut_off_at_its_end() -> None:
    cast = parse_cast(CAST)
    assert cast.header["width"] == 80
    assert [e[2] for e in cast.events] == ["one ", "100x30", "two ", "three"]


@pytest.mark.parametrize("data", [b"", b"not json\n", b'{"version": 1, "width": 80}\n', b"[1, 2]\n"])
def test_what_is_not_asciicast_v2_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(CliError, match="not asciicast v2"):
        parse_cast(data)


def test_pauses_are_the_recorded_ones_capped_by_idle_limit_and_divided_by_speed() -> None:
    cast = parse_cast(CAST)
    assert list(schedule(cast)) == [(0.5, "one "), (3.0, "two "), (600.0, "three")]
    assert list(schedule(cast, idle_limit=2.0)) == [(0.5, "one "), (2.0, "two "), (2.0, "three")]
    assert list(schedule(cast, speed=2.0, idle_limit=2.0)) == [(0.25, "one "), (1.0, "two "), (1.0, "three")]


def test_play_writes_the_output_in_order_and_sleeps_between() -> None:
    slept: list[float] = []
    out = io.BytesIO()
    play(Cast({"version": 2}, [(0.0, "o", "a"), (1.0, "o", "é"), (1.0, "o", "c")]), out, 1.0, None, slept.append)
    assert out.getvalue() == "aéc".encode()
    assert slept == [1.0]


def test_admin_set_recording_turns_an_orgs_recording_off_and_on(database_url: str, tmp_path: Path) -> None:
    env = {"ORZ_DATABASE_URL": database_url, "ORZ_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def orz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "admin", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    assert orz("create-org", "acme").returncode == 0
    out = orz("set-recording", "acme", "off")
    assert out.returncode == 0 and "recording is now off for org acme" in out.stdout, out.stderr
    out = orz("set-recording", "acme", "on")
    assert out.returncode == 0 and "recording is now on for org acme" in out.stdout, out.stderr
    out = orz("set-recording", "nobody", "off")
    assert out.returncode != 0 and "no such org: nobody" in out.stderr
    out = orz("set-recording", "acme", "maybe")
    assert out.returncode == 2
