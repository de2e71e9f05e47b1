"""`python -m rehearsal [--profile full|ci] [--workdir DIR]`: the chart's whole life on this machine.

Runs as root (network and mount namespaces). Prints one line per step and `rehearsal: N/M steps passed`;
exits non-zero when a step failed. See charts/orzbob-cloud/README.md ("The rehearsal").
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import sys
from pathlib import Path

from rehearsal.steps import run

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["full", "ci"], default="full")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "rehearsal")
    parser.add_argument("--helm", type=Path, default=ROOT / ".cache" / "bin" / "helm")
    parser.add_argument("--verbose", action="store_true", help="log what the kubelet and controllers do")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    # One rehearsal at a time per machine: they share the bridge and its addresses.
    with open("/run/lock/orz-rehearsal.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failures = run(args.workdir, args.helm, args.profile)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
