"""When `orz cloud attach` runs ssh again, and when it does not (cli/reconnect.py).

A stand-in `ssh` (a shell script) plays one scripted run per call: what it writes to stderr and its exit
status; the real-ssh, real-gateway version of the main case is tests/cli/test_gateway_drain.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api.schemas import GATEWAY_RESTARTING
from cli import reconnect

NOTICE = f"\\r\\n[orz] {GATEWAY_RESTARTING}; your session keeps running\\r\\n"
REFUSED = "ssh: connect to host 127.0.0.1 port 2222: Connection refused"


def fake_ssh(tmp_path: Path, runs: list[tuple[str, int]]) -> list[str]:
    """argv of an `ssh` whose n-th run prints runs[n][0] on stderr and exits with runs[n][1]."""
    count = tmp_path / "count"
    count.write_text("0")
    cases = "\n".join(f"  {n}) printf '{text}\\n' >&2; exit {status};;" for n, (text, status) in enumerate(runs))
    script = tmp_path / "ssh"
    script.write_text(f"#!/bin/sh\nn=$(cat {count})\necho $((n+1)) > {count}\ncase $n in\n{cases}\n"
                      "  *) echo 'ran too often' >&2; exit 99;;\nesac\n")
    script.chmod(0o755)
    return [str(script)]


def attach(tmp_path: Path, runs: list[tuple[str, int]]) -> tuple[int, int, list[float]]:
    """(final status, fresh certificates fetched, waits) of attach_until_done over the scripted runs."""
    argv = fake_ssh(tmp_path, runs)
    fetched: list[int] = []
    waits: list[float] = []

    def fresh() -> list[str]:
        fetched.append(1)
        return argv

    status = reconnect.attach_until_done("demo-1", argv, fresh, sleep=waits.append)
    return status, len(fetched), waits


def test_a_gateway_restart_reconnects_with_a_fresh_certificate(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    status, fetched, waits = attach(tmp_path, [
        (f"{NOTICE}Connection to 127.0.0.1 closed.", 255), ("", 0)])
    assert (status, fetched, len(waits)) == (0, 1, 1)
    err = capfd.readouterr().err
    assert GATEWAY_RESTARTING in err  # ssh's stderr reaches the user unchanged
    assert err.count("reconnecting to demo-1") == 1


def test_the_disconnect_message_alone_is_enough(tmp_path: Path) -> None:
    disconnect = f"Received disconnect from 127.0.0.1 port 2222:11: orz: {GATEWAY_RESTARTING}; reconnect"
    assert attach(tmp_path, [(disconnect, 255), ("", 0)])[:2] == (0, 1)


@pytest.mark.parametrize("runs", [
    [(f"{NOTICE}[detached (from session main)]", 0)],  # detached during the drain
    [(f"{NOTICE}", 1)],  # the session's own exit status
    [("Connection to 127.0.0.1 closed by remote host.", 255)],  # lost, but not for a restart
    [(REFUSED, 255)],  # never got through: ssh's error, as before
])
def test_no_reconnect_without_a_restart(tmp_path: Path, runs: list[tuple[str, int]],
                                        capfd: pytest.CaptureFixture[str]) -> None:
    status, fetched, _ = attach(tmp_path, runs)
    assert (status, fetched) == (runs[-1][1], 0)
    assert "reconnecting" not in capfd.readouterr().err


def test_no_replica_yet_is_retried_a_bounded_number_of_times(tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    status, fetched, waits = attach(tmp_path, [(NOTICE, 255), (REFUSED, 255), (REFUSED, 255), ("", 0)])
    assert (status, fetched) == (0, 3)
    assert waits == sorted(waits) and len(waits) == 3  # backing off

    status, fetched, waits = attach(tmp_path, [(NOTICE, 255)] + [(REFUSED, 255)] * 10)
    assert status == 255 and fetched == len(reconnect.BACKOFF_S)
    err = capfd.readouterr().err
    assert err.count("reconnecting to demo-1") == 2  # one line per restart, not per attempt
    assert "could not reconnect to demo-1" in err
