"""`python -m rehearsal [--profile full|ci] [--access direct|api] [--kubeconfig FILE --values FILE]`.

The chart's whole life, step by step as a platform engineer and a user live it. Without --kubeconfig
it runs on this machine's own one-node cluster (root: network and mount namespaces); with it, on that
cluster (hack/e2e-kind.sh). Prints one line per step and `rehearsal: N/M steps passed`; exits non-zero
when a step failed. See charts/orzbob-cloud/README.md ("The rehearsal").
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
    parser.add_argument("--access", choices=["direct", "api"], default="direct",
                        help="users reach the rehearsal's cluster by its load balancers, or only by port-forward")
    parser.add_argument("--kubeconfig", type=Path, help="run on this cluster instead of the rehearsal's own")
    parser.add_argument("--values", type=Path, default=ROOT / "hack" / "rehearsal-values.yaml",
                        help="the chart's values (kind: hack/kind-values.yaml)")
    parser.add_argument("--verbose", action="store_true", help="log what the kubelet and controllers do")
    args = parser.parse_args()
    args.helm, args.workdir, args.values = args.helm.resolve(), args.workdir.resolve(), args.values.resolve()
    if not args.helm.is_file():
        parser.error(f"no helm at {args.helm} (hack/get-helm.sh fetches it)")
    if args.kubeconfig is not None:
        return 1 if run(args.workdir, args.helm, args.profile, kubeconfig=args.kubeconfig, values=args.values) else 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    # One rehearsal at a time per machine: they share the bridge and its addresses.
    with open("/run/lock/orz-rehearsal.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failures = run(args.workdir, args.helm, args.profile, access=args.access, values=args.values)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
