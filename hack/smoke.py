#!/usr/bin/env python3
"""Smoke test of a running platform: create a session, attach over SSH, send `ping`, expect `pong`.

Uses the CLI login (`orz cloud login`, or the one `orz server` saved) and the real `ssh`:

    .venv/bin/python hack/smoke.py            # against ORZBOB_API_URL / the saved login
    .venv/bin/python hack/smoke.py --keep     # leave the session running afterwards

Exit status 0 means a user could create, attach and talk to a session; the session is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parent.parent
# A program that answers each `ping` line with `pong`, so the round trip proves input and output work.
PONG_PROGRAM = "bash -c 'echo ready; while read -r line; do [ \"$line\" = ping ] && echo pong; done'"


def orz(*args: str) -> subprocess.CompletedProcess[str]:
    # Run outside any git checkout: `orz cloud new` would otherwise clone this checkout's origin, which
    # the platform may rightly refuse (a local path, a private host). The smoke test needs no repository.
    with tempfile.TemporaryDirectory(prefix="orz-smoke-") as nowhere:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=nowhere,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)


def fail(message: str) -> None:
    print(f"smoke: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="do not kill the session at the end")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the session")
    args = parser.parse_args()

    created = orz("cloud", "new", "--no-attach", "--program", PONG_PROGRAM)
    if created.returncode != 0:
        fail(f"create: {created.stderr.strip() or created.stdout.strip()}")
    listed = json.loads(orz("cloud", "list", "--json").stdout)
    session = max(listed["instances"], key=lambda i: i["created_at"])["id"]
    print(f"smoke: created {session}")
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            status = json.loads(orz("cloud", "status", session, "--json").stdout)["instance"]["status"]
            if status == "running":
                break
            if status == "failed" or time.monotonic() > deadline:
                fail(f"session {session} is {status}")
            time.sleep(0.5)
        print(f"smoke: {session} is running; attaching")
        term = pexpect.spawn(sys.executable, ["-m", "cli", "cloud", "attach", session], cwd=str(ROOT),
                             encoding="utf-8", timeout=30, dimensions=(24, 80))
        try:
            term.expect("ready")
            term.sendline("ping")
            term.expect("pong")
            print("smoke: ping -> pong")
            term.send("\x02d")  # tmux detach (Ctrl-b d)
            term.expect(pexpect.EOF)
        except (pexpect.TIMEOUT, pexpect.EOF):
            fail(f"no pong; the terminal showed: {term.before!r}")
        finally:
            term.close(force=True)
    finally:
        if not args.keep:
            killed = orz("cloud", "kill", session)
            print(f"smoke: killed {session}" if killed.returncode == 0 else f"smoke: kill: {killed.stderr.strip()}")
    print("smoke: OK")


if __name__ == "__main__":
    main()
