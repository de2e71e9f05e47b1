"""The path users take, against OpenSSH, in one run: ssh -> gateway -> runner endpoint -> tmux -> program.

bench/gateway.py bridges the gateway to an OpenSSH sshd, so it prices the gateway alone. In production the
second hop is the runner's asyncssh endpoint (runner/sshd.py) and the program runs in tmux. Here:

    real path:  ssh -> gateway (its own process, uvloop) -> runner endpoint (its own process, as
                runner/main.py wires it) -> `tmux attach` -> program
    baseline:   ssh -> a private OpenSSH sshd on a free port -> `tmux attach` -> the same program

both with tmux (a session attach against `ssh host tmux attach-session`, each side its own tmux server
started with the runner's own config) and without (`ssh -tt host CMD` on a pty). Measured per round, the
two sides interleaved or back to back in the same round: keystroke echo p50/p99 (a raw `cat` in the pane,
timed until the key is visible in the terminal output), bulk through the pane (`cat` of a text file, timed
until tmux draws the marker printed after it) and through a bare pty and a bare pipe, scp and sftp
(download and upload) through the runner's SFTP/scp against sshd's sftp-server, connection set-up
(`ssh host true`), and memory: RSS per idle attached session in one gateway process (its upstream is
bench/gateway.py's idle asyncssh stand-in, so N can reach 10,000), and per attach on a runner (the
endpoint's RSS plus the PSS of the `tmux attach` it starts) against sshd's per-session processes.
A third side, on by default, is the prototype of option (a) of issue 22: the gateway in front of OpenSSH
sshd as the runner's endpoint, the gateway's key forced to bench/sshd_endpoint.sh (its figures carry
"sshd_endpoint_", its ratios "sshdep_"). A fourth, on by default when socat is installed, is the floor
of any design with a process between the user and the session: ssh -> socat (a C relay of bytes, no SSH,
no crypto) -> sshd -> `tmux attach` (its figures carry "relay_"). It answers what one more process in
the path costs before any SSH work is done in it. Every side uses AES-GCM and curve25519.
Figures are medians over the rounds; every ratio is real path / baseline (for latency and set-up time
lower is better, for throughput higher is better), and TARGETS holds the issue's target for each.

    python -m bench.real_path [--bytes 100M] [--samples 1000] [--rounds 3] [--sessions 1000]
        [--runner-sessions 50] [--idle-s 12] [--no-sshd-endpoint] [--no-relay] [--runner-uvloop]
        [--alt-runner loop|asyncssh-path | --alt-tree DIR] [--only echo,bulk,copies,setup,hold]

`--only hold` holds the idle sessions on one gateway and nothing else (no sshd, runner or rounds), to
iterate on the gateway's memory per session; `--tracemalloc` adds its top allocation sites per session,
`--gateway-tree DIR` runs that gateway from another checkout (A/B against a parent commit); `--alt-tree DIR`
adds the real path with both its gateway and its runner from another checkout, interleaved with this one's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from api.settings import Settings
from bench.gateway import (
    IDLE_S,
    SESSION,
    Child,
    Sshd,
    _drain,
    bench_credentials,
    common_args,
    free_port,
    gateway_to,
    hold_sessions,
    parse_size,
    pct,
    stop_all,
    wait_listening,
)
from bench.gateway_roles import raise_fd_limit
from runner.tmux import Tmux

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
ROUND_MEASURES = ("echo", "bulk", "copies", "setup")  # what each round measures (--only picks some)
MEASURES = (*ROUND_MEASURES, "hold")  # hold: idle sessions on one gateway process, once after the rounds
RAW_CAT = "stty raw -echo && printf 'ready{n}' && exec cat"
# (figure, comparison, target): each ratio is real path / baseline.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("tmux_ratio_echo_p50", "<=", 1.3), ("tmux_ratio_echo_p99", "<=", 1.8),
    ("pty_ratio_echo_p50", "<=", 1.3), ("pty_ratio_echo_p99", "<=", 1.8),
    ("ratio_pane_bulk", ">=", 0.9),
    ("ratio_sftp_get", ">=", 0.8), ("ratio_sftp_put", ">=", 0.8),
    ("ratio_scp_get", ">=", 0.8), ("ratio_scp_put", ">=", 0.8),
    ("ratio_setup", "<=", 1.05),
    ("gateway_idle_kib_per_session", "<=", 32.0),
)
# A complete escape sequence (CSI, OSC, charset, two-byte) in a terminal's output, to find what is drawn.
_ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()*+][ -~]|[ -/]*[0-~])")


class Screen:
    """Bytes a terminal received, reduced to the text it shows (escape sequences dropped, order kept)."""

    def __init__(self) -> None:
        self.text = b""
        self._tail = b""  # an escape sequence not complete yet

    def feed(self, data: bytes) -> None:
        data = self._tail + data
        cut = data.rfind(b"\x1b")
        if cut >= 0 and not _ESCAPE.match(data, cut):
            data, self._tail = data[:cut], data[cut:]
        else:
            self._tail = b""
        self.text += _ESCAPE.sub(b"", data)


class Terminal:
    """One OpenSSH client on a pty (`ssh -tt`), fed from a pipe; what it draws is read through Screen."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.samples: list[float] = []
        self.screen = Screen()

    async def start(self, marker: bytes) -> None:
        pipe = asyncio.subprocess.PIPE
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=pipe, stdout=pipe, stderr=pipe)
        await self.until(marker, 30)

    async def until(self, marker: bytes, timeout: float) -> None:
        """Read until `marker` is on the screen; forget the screen up to it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (at := self.screen.text.find(marker)) < 0:
            chunk = await asyncio.wait_for(self.proc.stdout.read(1 << 16), max(0.01, deadline - time.monotonic()))
            if not chunk:
                err = (await self.proc.stderr.read()).decode()[-300:] if self.proc.stderr else ""
                raise RuntimeError(f"{self.name}: closed before {marker!r}: {err}")
            self.screen.feed(chunk)
        self.screen.text = self.screen.text[at + len(marker):]

    async def type(self, ch: bytes) -> float:
        """Send one key; seconds until it is drawn."""
        assert self.proc.stdin is not None
        start = time.perf_counter()
        self.proc.stdin.write(ch)
        await self.proc.stdin.drain()
        await self.until(ch, 10)
        return time.perf_counter() - start

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


class Side:
    """How an OpenSSH client reaches one side, and where that side's tmux server is."""

    def __init__(self, name: str, ssh_args: list[str], dest: str, tmux: Tmux, attach: list[str]) -> None:
        self.name, self.ssh_args, self.dest, self.tmux, self.attach = name, ssh_args, dest, tmux, attach

    def ssh(self, *options: str, command: list[str]) -> list[str]:
        return ["ssh", *self.ssh_args, *options, self.dest, *command]

    def copy_args(self) -> list[str]:
        """The ssh options for scp and sftp (they take the port as -P)."""
        args = list(self.ssh_args)
        at = args.index("-p")
        return [*args[:at], "-P", args[at + 1], *args[at + 2:]]

    async def respawn(self, program: str) -> None:
        await self.tmux.run("respawn-pane", "-k", "-t", "main", "--", "sh", "-c", program)


async def echo_round(sides: list[Side], samples: int, tmux: bool) -> dict[str, list[float]]:
    """Keystrokes interleaved across the sides (so all see the same load) to a raw `cat`."""
    terms = []
    for side in sides:
        nonce = secrets.token_hex(4)
        program = RAW_CAT.format(n=nonce)
        if tmux:
            await side.respawn(program)
            term = Terminal(side.name, side.ssh("-tt", command=side.attach))
        else:
            term = Terminal(side.name, side.ssh("-tt", command=[program]))
        terms.append((term, f"ready{nonce}".encode()))
    keys = [bytes((c,)) for c in range(ord("a"), ord("z") + 1)]
    try:
        for term, marker in terms:
            await term.start(marker)
        for _ in range(20):  # warm up
            for term, _ in terms:
                await term.type(b"x")
        for i in range(samples):
            for term, _ in terms:
                term.samples.append(await term.type(keys[i % len(keys)]))
        return {term.name: term.samples for term, _ in terms}
    finally:
        for term, _ in terms:
            await term.stop()


async def pane_bulk(side: Side, big: Path) -> float:
    """Seconds from Enter to the marker tmux draws after a `cat` of `big` in the pane."""
    nonce = secrets.token_hex(4)
    await side.respawn(f"stty -echo; printf 'go{nonce}'; read x; cat {big}; printf 'end{nonce}'; exec sleep 3600")
    term = Terminal(side.name, side.ssh("-tt", command=side.attach))
    try:
        await term.start(f"go{nonce}".encode())
        start = time.perf_counter()
        assert term.proc.stdin is not None
        term.proc.stdin.write(b"\r")
        await term.until(f"end{nonce}".encode(), 600)
        return time.perf_counter() - start
    finally:
        await term.stop()


async def stream(argv: list[str], nbytes: int) -> float:
    """Bytes per second of a command's output (time from the first byte); at least `nbytes` must come."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        got, elapsed = await asyncio.to_thread(_drain, proc.stdout.fileno())
    finally:
        proc.stdout.close()
        proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if got < nbytes:
        raise RuntimeError(f"{argv[0]}: got {got} of {nbytes} bytes: {proc.stderr.read()[-300:]!r}")  # type: ignore[union-attr]
    return got / elapsed


async def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}): {err.decode()[-300:]}")
    return time.perf_counter() - start


async def copies(side: Side, big: Path, local: Path, nbytes: int) -> dict[str, float]:
    """MiB/s of sftp get/put and scp get/put (scp's default, the SFTP protocol) of `big`."""
    out: dict[str, float] = {}
    target = side.dest.split("@")[0] + "@127.0.0.1"
    batch = local.with_suffix(".batch")
    remote_put = big.with_name(f"put-{side.name}.bin")
    for name, lines in (("sftp_get", f"get {big} {local}\n"), ("sftp_put", f"put {big} {remote_put}\n")):
        batch.write_text(lines)
        out[name] = nbytes / await timed(["sftp", *side.copy_args(), "-q", "-b", str(batch), target]) / (1 << 20)
    out["scp_get"] = nbytes / await timed(["scp", *side.copy_args(), "-q", f"{target}:{big}", str(local)]) / (1 << 20)
    out["scp_put"] = nbytes / await timed(["scp", *side.copy_args(), "-q", str(big), f"{target}:{remote_put}"]) / (
        1 << 20)
    for path in (local, remote_put, batch):
        path.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ memory


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc's children lists)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out.extend(kids)
                todo.extend(kids)
    return out


def tree_pss_kib(pid: int, with_root: bool = True) -> int:
    return sum(pss_kib(p) for p in ([pid] if with_root else []) + descendants(pid))


async def hold_attaches(n: int, connect: Callable[[], Any], command: str | None, measure: Callable[[], int]
                        ) -> dict[str, float]:
    """Attach `n` idle pty sessions running `command` (None: the shell, an attach); memory per session."""
    before = measure()
    conns: list[asyncssh.SSHClientConnection] = []
    sem = asyncio.Semaphore(10)
    drawn = b"sleep"  # the pane runs `sleep`: an attach has drawn once the status line names it

    async def one() -> None:
        async with sem:
            conn = await connect()
            conns.append(conn)
            proc = await conn.create_process(command, term_type="xterm", term_size=(80, 24), encoding=None)
            seen = b""
            while drawn not in seen:
                seen += await asyncio.wait_for(proc.stdout.read(4096), 30)

    try:
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        await asyncio.sleep(1.0)
        after = measure()
        return {"sessions": n - len(failures), "failed": len(failures),
                **({"first_failure": repr(failures[0])} if failures else {}),
                "kib_per_session": (after - before) / max(1, n - len(failures))}
    finally:
        for conn in conns:
            conn.close()
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------------------------ run


SIDE_PREFIXES = {"real": "", "sshd_endpoint": "sshdep_", "relay": "relay_", "alt": "alt_"}


def prefix(side: Side) -> str:
    """Figures of the real path carry no prefix; the sshd-endpoint prototype's "sshdep_", the relay's "relay_",
    and the real path with the other runner (--alt-runner) "alt_"."""
    return SIDE_PREFIXES[side.name]


class Relay:
    """socat relaying bytes from a free port to `port`, one forked process per connection (as sshd forks);
    with `python`, bench/pyrelay.py instead: one Python process on uvloop, as the gateway runs."""

    def __init__(self, port: int, *, python: bool = False, spin_us: float = 0.0) -> None:
        self.port = free_port()
        argv = ([sys.executable, "-m", "bench.pyrelay", str(self.port), str(port), str(spin_us)] if python else
                ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,nodelay",
                 f"TCP:127.0.0.1:{port},nodelay"])
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=Path(__file__).resolve().parent.parent)
        wait_listening(self.port, argv[0])

    # The Python relay is one process: its CPU per echo is measured as the gateway's is.
    cpu_s = Child.cpu_s
    cpu_split_s = Child.cpu_split_s

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_STARTED = time.monotonic()


def phase(name: str) -> None:
    """Say on stderr what the run is doing now: a run that hangs then shows where."""
    print(f"[{time.monotonic() - _STARTED:7.1f} s] {name}", file=sys.stderr, flush=True)


async def one_round(direct: Side, others: list[Side], big: Path, nbytes: int, args: argparse.Namespace,
                    cpu: dict[str, Child], turn: int) -> dict[str, float]:
    r: dict[str, float] = {}
    sides = [direct, *others]
    for tmux in (True, False) if "echo" in args.only else ():
        label = "tmux" if tmux else "pty"
        cpu0 = {name: child.cpu_s() for name, child in cpu.items()}
        split0 = {name: child.cpu_split_s() for name, child in cpu.items()}
        phase(f"echo ({label})")
        lat = await echo_round(sides, args.samples, tmux)
        for name, child in cpu.items():
            r[f"{label}_{name}_cpu_us_per_echo"] = (child.cpu_s() - cpu0[name]) / (args.samples + 20) * 1e6
            # The kernel's share (socket and pty calls, wake-ups): what no Python cut can reach.
            user_s, system_s = (now - then for now, then in zip(child.cpu_split_s(), split0[name], strict=True))
            r[f"{label}_{name}_cpu_system_share"] = system_s / (user_s + system_s) if user_s + system_s else 0.0
        for side in sides:
            r[f"{label}_{side.name}_echo_p50_ms"] = statistics.median(lat[side.name]) * 1000
            r[f"{label}_{side.name}_echo_p99_ms"] = pct(lat[side.name], 99) * 1000
        for side in others:
            for q in ("p50", "p99"):
                r[f"{prefix(side)}{label}_ratio_echo_{q}"] = (r[f"{label}_{side.name}_echo_{q}_ms"]
                                                              / r[f"{label}_direct_echo_{q}_ms"])
    # Each measure runs on every side back to back, in an order that rotates with the round, so that a
    # burst of load from other jobs does not always land on the same side.
    order = sides[turn % len(sides):] + sides[:turn % len(sides)]
    bulk = "bulk" in args.only
    for side in order if bulk else ():
        phase(f"pane bulk: {side.name}")
        r[f"{side.name}_pane_bulk_mib_s"] = nbytes / await pane_bulk(side, big) / (1 << 20)
    for side in order if bulk else ():
        phase(f"pty bulk: {side.name}")
        cpu0 = {name: child.cpu_s() for name, child in cpu.items()}
        r[f"{side.name}_pty_bulk_mib_s"] = await stream(side.ssh("-tt", command=[f"cat {big}"]), nbytes) / (1 << 20)
        if side.name in ("real", "alt"):  # where the CPU goes when a pty streams (each path's own processes)
            for name, child in cpu.items():
                if name.startswith("sshdep_") or name == "relay" or name.startswith("alt_") != (side.name == "alt"):
                    continue
                r[f"pty_bulk_{name}_cpu_s_per_100mib"] = (child.cpu_s() - cpu0[name]) / nbytes * (100 << 20)
    for side in order if bulk else ():
        phase(f"exec bulk: {side.name}")
        r[f"{side.name}_exec_bulk_mib_s"] = await stream(side.ssh(command=[f"cat {big}"]), nbytes) / (1 << 20)
    for side in order if "copies" in args.only else ():
        phase(f"copies: {side.name}")
        cpu0 = {name: child.cpu_s() for name, child in cpu.items()}
        for name, value in (await copies(side, big, big.parent.parent / f"local-{side.name}.bin", nbytes)).items():
            r[f"{side.name}_{name}_mib_s"] = value
        if side.name == "real":  # where the CPU goes when files are copied (four copies of the file)
            for name, child in cpu.items():
                if not name.startswith(("sshdep_", "alt_")):
                    r[f"copies_{name}_cpu_s_per_100mib"] = (child.cpu_s() - cpu0[name]) / 4 / nbytes * (100 << 20)
    for side in order if "setup" in args.only else ():
        phase(f"set-up: {side.name}")
        setups = [await timed(side.ssh(command=["true"])) for _ in range(args.setup_runs)]
        r[f"{side.name}_setup_ms"] = statistics.median(setups) * 1000
    for side in others:
        for name in ("pane_bulk", "pty_bulk", "exec_bulk", "sftp_get", "sftp_put", "scp_get", "scp_put"):
            if f"direct_{name}_mib_s" in r:
                r[f"{prefix(side)}ratio_{name}"] = r[f"{side.name}_{name}_mib_s"] / r[f"direct_{name}_mib_s"]
        if "direct_setup_ms" in r:
            r[f"{prefix(side)}ratio_setup"] = r[f"{side.name}_setup_ms"] / r["direct_setup_ms"]
    return r


def verdicts(report: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Each target of the issue met or missed ("pass"/"MISS"), for the real path or the prototype."""
    out = {}
    for key, op, target in TARGETS:
        value = report.get(prefix + key)
        if value is None:
            continue
        met = value <= target if op == "<=" else value >= target
        out[key] = f"{value:.2f} (target {op} {target}): {'pass' if met else 'MISS'}"
    return out


async def hold_only(args: argparse.Namespace) -> dict[str, Any]:
    """`--only hold`: the held idle sessions on one gateway process, without the rounds' processes."""
    work = Path(tempfile.mkdtemp(prefix="orz-rp-", dir="/tmp"))
    try:
        settings = Settings(data_dir=work / "gw")
        _, _, user, signed = bench_credentials(work, settings)
        return {"load_average": os.getloadavg(), "gateway_loop": "uvloop" if args.uvloop else "asyncio",
                **(await held_sessions(work, user, signed, settings, args))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def held_sessions(work: Path, user: asyncssh.SSHKey, signed: Any, settings: Settings,
                        args: argparse.Namespace) -> dict[str, Any]:
    """The gateway's figure for the target: RSS per idle attached session with --sessions held."""
    cert = asyncssh.import_certificate(signed.text)
    held = await hold_sessions(work, args.sessions, user, cert, settings, args.uvloop, heap=args.tracemalloc,
                               tree=args.gateway_tree, idle_s=args.idle_s)
    report = {"gateway_held": held, "gateway_idle_kib_per_session": held["rss_per_session_kib"]}
    report["targets"] = verdicts(report)
    return report


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if not args.only & set(ROUND_MEASURES):
        return await hold_only(args)
    work = Path(tempfile.mkdtemp(prefix="orz-rp-", dir="/tmp"))  # short: tmux sockets live here
    work.chmod(0o755)
    sshd: Sshd | None = None
    children: list[Child] = []
    base_tmux: Tmux | None = None
    relay: Relay | None = None
    try:
        settings = Settings(data_dir=work / "gw")
        gw_client, gw_host, user, signed = bench_credentials(work, settings)
        workspace = work / "ws"
        workspace.mkdir()
        big = workspace / "big.txt"
        line = (b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2)[:99] + b"\n"
        with big.open("wb") as f:
            block = line * ((1 << 20) // len(line))
            left = args.bytes
            while left > 0:
                f.write(block[:left])
                left -= len(block)
        nbytes = big.stat().st_size

        sftp_server = SFTP_SERVER if Path(SFTP_SERVER).exists() else "internal-sftp"
        gw_client_pub = gw_client.export_public_key().decode().strip()
        # Option (a) of the issue, as a prototype: sshd as the runner's endpoint, the gateway's key forced
        # to bench/sshd_endpoint.sh (what runner/sshd.py does per channel), on its own tmux server.
        endpoint_script = Path(__file__).with_name("sshd_endpoint.sh")
        forced = (f'command="sh {endpoint_script} rw {workspace} {work / "se.sock"} {work / "se.activity"}" '
                  f"{gw_client_pub}")
        sshd = Sshd(work, [user.export_public_key().decode().strip(), *([forced] if args.sshd_endpoint else [])],
                    sftp=sftp_server)
        phase("starting sshd, the runner endpoint and the gateways")
        # Every role starts at once, side by side (each a Python process that imports asyncssh and the
        # gateway or runner: seconds apiece on a busy machine); a gateway is told its runner when that is up.
        (work / "rs").mkdir()
        runner = Child("--serve-runner-endpoint", str(work / "rs"), str(workspace), gw_client_pub,
                       *(["--uvloop"] if args.runner_uvloop else []), wait=False)
        children.append(runner)
        gw = gateway_to(runner, None, settings.data_dir, *(["--uvloop"] if args.uvloop else []),
                        tree=args.gateway_tree)
        children.append(gw)
        sshd_pub = sshd.host_key.export_public_key().decode().strip()
        gw_pub = gw_host.export_public_key().decode().strip()
        cpu = {"gateway": gw, "runner": runner}
        alt_gw: Child | None = None
        if args.alt_runner or args.alt_tree:  # the same path with another runner (and gateway), interleaved
            (work / "ra").mkdir()
            alt_loop = ["--uvloop"] if args.runner_uvloop != (args.alt_runner == "loop") else []
            alt_runner = Child("--serve-runner-endpoint", str(work / "ra"), str(workspace), gw_client_pub,
                               *alt_loop, *(["--no-fast-path"] if args.alt_runner == "asyncssh-path" else []),
                               tree=args.alt_tree, wait=False)
            children.append(alt_runner)
            alt_gw = gateway_to(alt_runner, None, settings.data_dir, *(["--uvloop"] if args.uvloop else []),
                                tree=args.alt_tree)
            children.append(alt_gw)
            cpu.update(alt_gateway=alt_gw, alt_runner=alt_runner)
        gw_sshd: Child | None = None
        if args.sshd_endpoint:
            gw_sshd = Child("--serve-gateway", str(settings.data_dir), "127.0.0.1", str(sshd.port), sshd_pub,
                            "--upstream-user", getpass.getuser(), *(["--uvloop"] if args.uvloop else []),
                            tree=args.gateway_tree, wait=False)
            children.append(gw_sshd)
            cpu["sshdep_gateway"] = gw_sshd
        for child in children:
            child.ready()
        known = work / "known_hosts"
        known.write_text(f"[127.0.0.1]:{sshd.port} {sshd_pub}\n[127.0.0.1]:{gw.port} {gw_pub}\n"
                         + (f"[127.0.0.1]:{gw_sshd.port} {gw_pub}\n" if gw_sshd else "")
                         + (f"[127.0.0.1]:{alt_gw.port} {gw_pub}\n" if alt_gw else ""))
        # The same cipher and key exchange on every side: what the gateway offers (asyncssh has no
        # sntrup761, which OpenSSH 9.2 would pick with sshd and which costs ~100 ms per connection, nor
        # ChaCha20, which the gateway leaves out).
        ciphers = ["-o", "Ciphers=aes128-gcm@openssh.com", "-o", "KexAlgorithms=curve25519-sha256"]
        # The baseline's tmux: the runner's Tmux class and config, same program, same environment.
        env = {"PATH": os.environ["PATH"], "HOME": str(workspace), "LANG": "C.UTF-8"}
        base_tmux = Tmux(work / "base.sock")
        await base_tmux.start(["sleep", "infinity"], cwd=workspace, env=env)
        direct = Side("direct", [*common_args(sshd.port, known, ciphers), "-i", str(work / "id")],
                      f"{getpass.getuser()}@127.0.0.1", base_tmux, base_tmux.attach_argv(False))
        real = Side("real", [*common_args(gw.port, known, ciphers), "-i", str(work / "id"),
                             "-o", f"CertificateFile={work / 'id-cert.pub'}"],
                    f"{SESSION}@127.0.0.1", Tmux(work / "rs" / "tmux.sock"), [])
        others = [real]
        if alt_gw is not None:
            others.append(Side("alt", [*common_args(alt_gw.port, known, ciphers), "-i", str(work / "id"),
                                       "-o", f"CertificateFile={work / 'id-cert.pub'}"],
                               f"{SESSION}@127.0.0.1", Tmux(work / "ra" / "tmux.sock"), []))
        if gw_sshd is not None:
            proto_tmux = Tmux(work / "se.sock")
            await proto_tmux.start(["sleep", "infinity"], cwd=workspace, env=env)
            others.append(Side("sshd_endpoint", [*common_args(gw_sshd.port, known, ciphers), "-i", str(work / "id"),
                                                 "-o", f"CertificateFile={work / 'id-cert.pub'}"],
                               f"{SESSION}@127.0.0.1", proto_tmux, []))
        if args.relay:
            relay = Relay(sshd.port, python=args.relay_python, spin_us=args.relay_spin_us)
            if args.relay_python:
                cpu["relay"] = relay  # type: ignore[assignment]
            relay_tmux = Tmux(work / "relay.sock")
            await relay_tmux.start(["sleep", "infinity"], cwd=workspace, env=env)
            # sshd checks the host key by name and port: the relay's port gets sshd's key.
            with known.open("a") as f:
                f.write(f"[127.0.0.1]:{relay.port} {sshd_pub}\n")
            others.append(Side("relay", [*common_args(relay.port, known, ciphers), "-i", str(work / "id")],
                               f"{getpass.getuser()}@127.0.0.1", relay_tmux, relay_tmux.attach_argv(False)))
        rounds = []
        for n in range(args.rounds):
            rounds.append(await one_round(direct, others, big, nbytes, args, cpu, n))
            print(f"round {n + 1}/{args.rounds} done", file=sys.stderr)
        report: dict[str, Any] = {"bytes": nbytes, "samples": args.samples, "rounds": args.rounds,
                                  "gateway_loop": "uvloop" if args.uvloop else "asyncio",
                                  "runner_loop": "uvloop" if args.runner_uvloop else "asyncio",
                                  "alt_runner": args.alt_runner or "none",
                                  "alt_tree": str(args.alt_tree or ""), "relay_spin_us": args.relay_spin_us,
                                  "load_average": os.getloadavg(), "baseline_sftp": sftp_server}
        for key in rounds[0]:
            values = [r[key] for r in rounds]
            report[key] = statistics.median(values)
            if args.rounds > 1 and "ratio" in key:
                report[f"{key}_range"] = [min(values), max(values)]

        # Memory per attach on a runner: its endpoint + the `tmux attach` each attach starts, against sshd's
        # per-session processes + their `tmux attach`. Both attach over asyncssh from this process.
        if args.runner_sessions:
            await real.respawn("exec sleep 3600")
            await direct.respawn("exec sleep 3600")
            runner_host = asyncssh.import_public_key(runner.info["host_key"])

            async def to_runner() -> asyncssh.SSHClientConnection:
                return await asyncssh.connect("127.0.0.1", runner.port, username="rw", client_keys=[gw_client],
                                              known_hosts=([runner_host], [], []), config=None, agent_path=None)

            async def to_sshd() -> asyncssh.SSHClientConnection:
                return await asyncssh.connect("127.0.0.1", sshd.port, username=getpass.getuser(),
                                              client_keys=[user], known_hosts=([sshd.host_key.convert_to_public()],
                                                                               [], []), config=None, agent_path=None)

            phase("attaches held on the runner and on sshd")
            pid_r = runner.proc.pid
            assert sshd is not None
            pid_s = sshd.proc.pid
            report["runner_attach"] = await hold_attaches(args.runner_sessions, to_runner, None,
                                                          lambda: tree_pss_kib(pid_r))
            report["sshd_attach"] = await hold_attaches(args.runner_sessions, to_sshd,
                                                        " ".join(base_tmux.attach_argv(False)),
                                                        lambda: tree_pss_kib(pid_s))
            report["ratio_runner_attach_memory"] = (report["runner_attach"]["kib_per_session"]
                                                   / report["sshd_attach"]["kib_per_session"])
        stop_all(children)
        children.clear()
        if args.sessions and "hold" in args.only:
            phase("idle sessions held on one gateway")
            report.update(await held_sessions(work, user, signed, settings, args))
        report["targets"] = verdicts(report)
        if args.sshd_endpoint:
            report["sshdep_targets"] = verdicts(report, "sshdep_")
        if args.relay:
            report["relay_targets"] = verdicts(report, "relay_")
        if args.alt_runner or args.alt_tree:
            report["alt_targets"] = verdicts(report, "alt_")
        return report
    finally:
        stop_all(children)
        if base_tmux is not None:
            await base_tmux.kill_server()
            await Tmux(work / "se.sock").kill_server()
            await Tmux(work / "relay.sock").kill_server()
        if relay is not None:
            relay.stop()
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_size, default=100 << 20, help="file size for bulk, scp, sftp (100M)")
    parser.add_argument("--samples", type=int, default=1000, help="keystrokes timed per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians over them")
    parser.add_argument("--setup-runs", type=int, default=10)
    parser.add_argument("--only", type=lambda v: set(v.split(",")), default=set(MEASURES),
                        help=f"comma-separated measures to run per round, of {','.join(MEASURES)} (default: all)")
    parser.add_argument("--sessions", type=int, default=1000,
                        help="idle sessions held on one gateway process (target 10000; 0 skips)")
    parser.add_argument("--idle-s", type=float, default=IDLE_S, metavar="S",
                        help=f"how long the held sessions sit idle before the gateway's RSS is read ({IDLE_S:g} s: "
                             "past two of gateway.splice's idle sweeps; shorter counts the AES-GCM contexts it "
                             "lets go of then, for a quick run)")
    parser.add_argument("--runner-sessions", type=int, default=50,
                        help="idle attaches held on one runner, and on sshd for the baseline (0 skips)")
    parser.add_argument("--runner-uvloop", action="store_true",
                        help="run the runner endpoint on uvloop (default: asyncio's loop, as runner/main.py does)")
    parser.add_argument("--alt-runner", choices=("loop", "asyncssh-path"), default=None,
                        help="a fourth side, interleaved: the real path with the runner on the other event loop "
                             "(loop) or without its fast path (asyncssh-path); its figures carry alt_")
    parser.add_argument("--no-sshd-endpoint", dest="sshd_endpoint", action="store_false",
                        help="leave out the prototype: the gateway in front of sshd with bench/sshd_endpoint.sh")
    parser.add_argument("--no-relay", dest="relay", action="store_false",
                        help="leave out the floor: socat relaying bytes between ssh and sshd (on when socat exists)")
    parser.add_argument("--relay-python", action="store_true",
                        help="the floor's relay in Python on uvloop (bench/pyrelay.py) instead of socat")
    parser.add_argument("--relay-spin-us", type=float, default=0.0, metavar="US",
                        help="with --relay-python: the relay busy that many µs per read (what a hop's CPU costs)")
    parser.add_argument("--asyncio", dest="uvloop", action="store_false",
                        help="run the gateway on asyncio's own loop (default: uvloop, as `orz gateway` does)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="hold: also the gateway's top heap allocation sites per session (its RSS then "
                             "includes tracemalloc's tables: take the RSS figure from a run without)")
    parser.add_argument("--gateway-tree", type=Path, metavar="DIR",
                        help="run the gateway processes from this checkout (an A/B against another commit)")
    parser.add_argument("--alt-tree", type=Path, metavar="DIR",
                        help="a fourth side, interleaved: the real path with its gateway and runner both from this "
                             "checkout (an A/B against another commit in one run); its figures carry alt_")
    args = parser.parse_args()
    if args.relay and not args.relay_python and shutil.which("socat") is None:
        print("socat not found (apt-get install -y socat): the relay floor is left out", file=sys.stderr)
        args.relay = False
    if args.alt_runner and args.alt_tree:
        parser.error("--alt-runner and --alt-tree each make the fourth side: pick one")
    if args.only - set(MEASURES):
        parser.error(f"--only: unknown measure(s) {','.join(sorted(args.only - set(MEASURES)))}")
    raise_fd_limit()
    report = asyncio.run(main(args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
