#!/usr/bin/env python3
"""Soak and chaos: run the platform as users would for a while, break it on purpose, report what happened.

    make soak                      # SOAK_S seconds (default 1800), 20 users, every fault, SQLite
    make soak-ci                   # the CI profile: 120 s, a few users
    make soak-rehearsal            # the CI profile on the chart, on the Kubernetes rehearsal (root)
    make soak-rehearsal SOAK_REHEARSAL_ACCESS=api   # the same, users only through port-forwards
    .venv/bin/python hack/soak.py --seconds 300 --users 3 --database postgres

The platform is the embedded default's services (`orz api`, `orz gateway`, `orz scheduler`, local
sandboxed runners) as separate processes on one data dir, so each can be killed -9 and started again;
`--topology server` runs `orz server` itself (all three in one process, killed -9 as one).
`--target rehearsal` instead installs the chart with helm on the rehearsal's one-node cluster (rehearsal/;
root) and runs the same users and the faults that exist there (hack/soak_rehearsal.py); with `--access api`
its users reach it only through port-forwards by the cluster's API server, as on kind.
Users are real: the orz CLI, OpenSSH ssh/scp/-L into tmux, REST clients and browser-door WebSockets.
The report (markdown, JSON, PNG) goes to <data dir>/soak/; its path is printed, and the last line is
`soak: <ops> ops, <pct>% ok outside faults, <lost> lost, <faults> faults, <recovered> recovered`.
Exit status 1 when data was lost, a fault was not recovered or something was left behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import httpx  # noqa: E402
from soak_faults import FAULTS, REHEARSAL_FAULTS, SERVER_FAULTS, Injector  # noqa: E402
from soak_platform import Platform, SoakPlatform  # noqa: E402
from soak_report import Sampler, build, last_line, verdict, write  # noqa: E402
from soak_users import Actor, Recorder, RestUser, SshUser, WebUser, missing_tools  # noqa: E402

PROFILES = {
    "full": {"seconds": 1800, "users": 20, "rest_users": 2, "web_users": 2},
    "ci": {"seconds": 120, "users": 3, "rest_users": 1, "web_users": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--target", choices=("embedded", "rehearsal"), default="embedded",
                        help="embedded: the embedded default's services as processes here; rehearsal: the chart "
                             "installed on the Kubernetes rehearsal's one-node cluster (root)")
    parser.add_argument("--helm", type=Path, default=HERE.parent / ".cache" / "bin" / "helm",
                        help="helm for --target rehearsal (make helm fetches it)")
    parser.add_argument("--access", choices=("direct", "api"), default="direct",
                        help="--target rehearsal: users reach the chart at its load balancers (direct) or only "
                             "through port-forwards to Ready Pods by the cluster's API server (api, as on kind)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="how long users run (default: SOAK_S, else the profile's)")
    parser.add_argument("--users", type=int, default=None, help="simulated SSH users")
    parser.add_argument("--rest-users", type=int, default=None, help="REST automation clients")
    parser.add_argument("--web-users", type=int, default=None, help="browser-door users")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default=os.environ.get("SOAK_DB", "sqlite"),
                        help="sqlite: the embedded default; postgres: a database made for the soak on 127.0.0.1:5432")
    parser.add_argument("--topology", choices=("split", "server"), default="split",
                        help="split: orz api, gateway and scheduler as processes of their own; server: orz server")
    parser.add_argument("--faults", default=None,
                        help=f"comma-separated, in order (default all: {','.join(FAULTS)}; with --topology server "
                             f"{','.join(SERVER_FAULTS)}; with --target rehearsal {','.join(REHEARSAL_FAULTS)}; "
                             "none: '')")
    parser.add_argument("--idle-timeout", type=int, default=20, help="the plan's idle timeout for the soak (s)")
    parser.add_argument("--base", type=Path, default=None, help="where the data dir goes (default: a temp dir)")
    parser.add_argument("--sabotage", action="store_true",
                        help="delete one user's workspace file behind their back: the report must count it lost")
    parser.add_argument("--verbose", action="store_true", help="a line per operation, not only failures")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.seconds is None:
        args.seconds = float(os.environ.get("SOAK_S") or profile["seconds"])
    for key in ("users", "rest_users", "web_users"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    if args.target == "rehearsal":
        known, where = REHEARSAL_FAULTS, "--target rehearsal"
    else:
        known, where = (SERVER_FAULTS if args.topology == "server" else FAULTS), f"--topology {args.topology}"
    args.faults = [f for f in (",".join(known) if args.faults is None else args.faults).split(",") if f]
    unknown = set(args.faults) - set(known)
    if unknown:
        parser.error(f"unknown faults for {where}: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    if args.access != "direct" and args.target != "rehearsal":
        parser.error("--access api needs --target rehearsal (the embedded services have no cluster API)")
    if args.target == "rehearsal" and os.geteuid() != 0:
        parser.error("--target rehearsal needs root (the rehearsal's namespaces, bridge and mounts)")
    if "pg-terminate" in args.faults and args.target == "embedded" and args.database != "postgres":
        args.faults.remove("pg-terminate")  # there is no connection to terminate in SQLite
    if "disk-full" in args.faults and os.geteuid() != 0:
        args.faults.remove("disk-full")  # mounting the small disk needs root
        print("soak: not root: no disk-full fault", file=sys.stderr)
    return args


def run_faults(injector: Injector, kinds: list[str], first_at: float, last_at: float, stop: threading.Event) -> None:
    """One after another, spread evenly between first_at and last_at (wall clock)."""
    step = (last_at - first_at) / max(1, len(kinds) - 1) if len(kinds) > 1 else 0
    for i, kind in enumerate(kinds):
        delay = first_at + i * step - time.time()
        if stop.wait(max(0.0, delay)):
            return  # the run is over: a fault now would only be seen by the clean-up
        injector.inject(kind)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"soak: needs {', '.join(missing)} (hack/setup.sh installs them)", file=sys.stderr)
        return 2
    base = args.base or Path(tempfile.mkdtemp(prefix="orz-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    # Sandboxed sessions (their own uids) clone the fixture from under it.
    os.chmod(base, 0o755)  # noqa: S103  # nosec B103
    platform: SoakPlatform
    if args.target == "rehearsal":
        from soak_rehearsal import RehearsalPlatform

        platform = RehearsalPlatform(base, idle_timeout_s=args.idle_timeout, helm=args.helm.resolve(),
                                     access_mode=args.access)
        where = "the chart on the rehearsal" + (", users by port-forward" if args.access == "api" else "")
    else:
        platform = Platform(base, args.database, idle_timeout_s=args.idle_timeout, topology=args.topology)
        where = f"{args.database}, {args.topology}"
    rec = Recorder(verbose=args.verbose)
    stop, fault_stop = threading.Event(), threading.Event()

    def stop_early(signum: int, _frame: object) -> None:
        # Ctrl-C or a CI job cancelled: wind down as at the end (users kill their sessions, the platform
        # stops), rather than leave sessions' runners behind, which outlive the services by design.
        print(f"soak: {signal.Signals(signum).name}: stopping early", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, stop_early)
    # A user's thread that dies of a bug in the harness stops exercising the platform: that fails the run.
    crashed: list[str] = []
    default_hook = threading.excepthook

    def note_crash(hook: threading.ExceptHookArgs) -> None:
        crashed.append(f"{hook.thread.name if hook.thread else '?'}: {hook.exc_type.__name__}: {hook.exc_value}")
        default_hook(hook)

    threading.excepthook = note_crash
    signal.signal(signal.SIGINT, stop_early)
    print(f"soak: {args.seconds:.0f} s, {args.users} ssh + {args.rest_users} rest + {args.web_users} web users, "
          f"{where}, faults: {', '.join(args.faults) or 'none'}; data in {platform.data}",
          flush=True)
    actors: list[Actor] = []
    injector: Injector | None = None
    sampler = Sampler(platform)
    started = ended = time.time()
    orphans: list[str] = []
    unknown: list[str] = []
    db_rows: dict[str, int] = {}
    try:
        platform.setup()
        sampler.start()
        ops_user = SshUser("operator", platform, rec, stop)
        injector = Injector(platform, rec, fault_stop, ops_user)
        injector.prepare(args.faults)
        actors += [SshUser(f"user{i}", platform, rec, stop, sabotage=args.sabotage and i == 0)
                   for i in range(args.users)]
        actors += [RestUser(f"rest{i}", platform, rec, stop) for i in range(args.rest_users)]
        actors += [WebUser(f"web{i}", platform, rec, stop) for i in range(args.web_users)]
        started = time.time()
        for actor in actors:
            actor.start()
        faults = threading.Thread(target=run_faults, name="faults", daemon=True, args=(
            injector, args.faults, started + min(15.0, args.seconds * 0.15), started + args.seconds * 0.8, fault_stop))
        faults.start()
        stop.wait(args.seconds)
        ended = time.time()
        print("soak: time is up; users finish what they are doing and kill their sessions", flush=True)
        stop.set()
        fault_stop.set()
        faults.join(timeout=180)
        for actor in actors:
            actor.join(timeout=240)
        injector.cleanup()
        for actor in actors:
            for sid in list(actor.sessions):
                platform.orz("cloud", "kill", "--force", sid, env=getattr(actor, "env", platform.env))
        unknown = kill_the_rest(platform)
        orphans = wait_for_orphans(platform)
        sampler.sample()
        db_rows = {state: n for state, n in platform.db_rows().items() if state != "deleted"}
    finally:
        sampler.stop_event.set()
        platform.stop()
        platform.drop_database()
        if injector is not None:
            for mount in injector.mounts:
                os.system(f"umount -l '{mount}' 2>/dev/null")  # noqa: S605  # nosec B605  # our own path
    report = build(rec, injector.faults if injector else [], sampler, platform, started, ended,
                   {"users": args.users, "rest_users": args.rest_users, "web_users": args.web_users,
                    "topology": args.topology if args.target == "embedded" else "kubernetes",
                    "target": args.target, "access": args.access,
                    "profile": args.profile, "data_dir": str(platform.data)})
    report["orphans"] = orphans
    # Sessions a client never heard of (its create's answer was lost to a fault): killed by the admin.
    report["unclaimed_sessions"] = unknown
    report["db_rows_left"] = db_rows
    artifacts = getattr(platform, "artifacts", None)  # the rehearsal's Pods: logs, status history, events
    report["artifacts"] = str(artifacts) if artifacts else None
    md_path, json_path = write(report, platform.data / "soak")
    for line in (md_path.read_text().splitlines()[:-1]):
        print(line)
    png = Path(report["png"]).name if report["png"] else "none"
    print(f"soak: report {md_path} (JSON {json_path.name}, PNG {png})")
    if artifacts:
        print(f"soak: Pod evidence (logs, readiness and probe history, events) in {artifacts}")
    print(last_line(report), flush=True)
    missed = verdict(report)
    hard = report["totals"]["lost"] or any(not f["recovered"] for f in report["faults"]) or orphans
    if missed:
        print("soak: targets missed: " + "; ".join(missed), file=sys.stderr)
    if crashed:
        print("soak: harness threads crashed: " + "; ".join(crashed), file=sys.stderr)
    return 1 if hard or crashed else 0


def kill_the_rest(platform: SoakPlatform) -> list[str]:
    """As the org's admin, kill every session still there; their ids."""
    headers = {"Authorization": f"Bearer {platform.admin_token}"}
    with httpx.Client(base_url=platform.api_url, headers=headers, timeout=30) as api:
        listed = api.get("/v1/instances")
        left = [i["id"] for i in listed.json().get("instances", []) if i["status"] != "deleted"] \
            if listed.status_code == 200 else []
        for sid in left:
            api.delete(f"/v1/instances/{sid}", params={"force": "true"})  # cleanup: whatever it holds
    return left


def wait_for_orphans(platform: SoakPlatform, timeout: float = 60.0) -> list[str]:
    """What is left of sessions once all were killed (processes, session directories; on Kubernetes the
    sessions' Pods, volumes, Secrets), given a while to go."""
    deadline = time.monotonic() + timeout
    while True:
        left = platform.leftovers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
