"""Gateway benchmark: through the gateway vs direct OpenSSH, side by side in one run (loopback only).

Measures keystroke echo latency (p50/p99), bulk download throughput, connection setup time, and the
gateway's RSS per idle attached session with N sessions held. The baseline is a private `sshd` on a free
port with its own host key and config; the gateway bridges to that same sshd, so the ratio is the
gateway's own cost. The API's authorize route is replaced by an in-process stub (the bench measures the
SSH path, not the API), and the gateway logs in to sshd as the current user instead of "rw"/"ro".
For the held-sessions figure the runner is a small asyncssh stand-in (sshd would fork per session).

    python -m bench.gateway [--bytes 1G] [--sessions 1000] [--samples 2000] [--asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh

from api.credentials import jwt as attach_jwt
from api.credentials import ssh_ca
from api.settings import Settings
from bench.gateway_roles import CERT_TTL_S

SESSION = "bench"
USER = "usr_bench"
SSHD = "/usr/sbin/sshd"
# Held sessions are measured this long after the last one attached: past two of gateway.splice's
# IDLE_SWEEP_S, after which an idle connection keeps no AES-GCM context.
IDLE_S = 12.0


# ------------------------------------------------------------------------------------- orchestration


class Child:
    """A role of this script in its own process (so its RSS and CPU are its own).

    The process starts at once; `ready()` waits until it says it is listening (its port, and the runner
    endpoint's host key). Roles started with `wait=False` start side by side: each is a Python process
    that imports asyncssh and the gateway or runner, seconds apiece on a busy machine."""

    def __init__(self, *args: str, tree: Path | None = None, wait: bool = True) -> None:
        # `tree`: another checkout whose code this role runs (an A/B against a parent commit in the same hour).
        self.name = args[0]
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.gateway_roles", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=tree or Path(__file__).resolve().parent.parent)
        self.info: dict[str, Any] = {}
        self.port = 0
        # A gateway told its upstream once that has started (see gateway_to): (the upstream, its host key).
        self.upstream: tuple[Child, str | None] | None = None
        if wait:
            self.ready()

    def ready(self) -> Child:
        if self.info:
            return self
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.upstream is not None:
            upstream, host_key = self.upstream
            upstream.ready()
            self.upstream = None
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(json.dumps({"port": upstream.port,
                                                  "host_key": host_key or upstream.info["host_key"]}).encode() + b"\n")
                self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.name} failed to start")
        self.info = json.loads(line)
        self.port = int(self.info["port"])
        return self

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        """User + system CPU time this process has used so far: the scheduler's nanosecond count summed over
        its threads (/proc/PID/stat counts clock ticks, 10 ms each: ~10 µs per keystroke over 1,000 of
        them), or the tick count where schedstat is missing."""
        try:
            return sum(int((task / "schedstat").read_text().split()[0])
                       for task in Path(f"/proc/{self.proc.pid}/task").iterdir()) / 1e9
        except (OSError, ValueError, IndexError):
            return sum(self.cpu_split_s())

    def cpu_split_s(self) -> tuple[float, float]:
        """(user, system) CPU time this process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def stop_all(children: list[Child]) -> None:
    """Stop every child, side by side (each gateway closes its connections on SIGTERM)."""
    for child in children:
        child.terminate()
    for child in children:
        child.stop()


def gateway_to(upstream: Child, host_key: str | None, data_dir: Path, *extra: str,
               tree: Path | None = None) -> Child:
    """A gateway role routed to `upstream` (a runner role; `host_key` if that role does not say its own),
    started at once, while the upstream still starts: `ready()` tells it the upstream's port and host key
    on its stdin. A gateway from another checkout (`tree`) may not read them there: it starts, with them
    as arguments, once the upstream has."""
    if tree is not None:
        upstream.ready()
        return Child("--serve-gateway", str(data_dir), "127.0.0.1", str(upstream.port),
                     host_key or upstream.info["host_key"], *extra, tree=tree, wait=False)
    gw = Child("--serve-gateway", str(data_dir), "127.0.0.1", "-", "-", *extra, wait=False)
    gw.upstream = (upstream, host_key)
    return gw


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, what: str, timeout_s: float = 10.0) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


class Sshd:
    """A private sshd on a free port: its own host key, config and authorized keys."""

    def __init__(self, work: Path, authorized: list[str], extra_config: tuple[str, ...] = (),
                 sftp: str = "internal-sftp") -> None:
        if not Path(SSHD).exists():
            raise SystemExit("sshd not found: apt-get install -y openssh-server")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        (work / "sshd_host").write_bytes(self.host_key.export_private_key())
        (work / "sshd_host").chmod(0o600)
        (work / "authorized_keys").write_text("\n".join(authorized) + "\n")
        self.port = free_port()
        config = work / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {work / 'sshd_host'}",
            f"AuthorizedKeysFile {work / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
            "PidFile none", "Compression no", "MaxStartups 100:30:200", "MaxSessions 100", "LogLevel ERROR",
            "PrintMotd no", "PrintLastLog no", f"Subsystem sftp {sftp}",
            # Debian's bash sources ~/.bashrc when sshd starts it (SSH_CLIENT set, SHLVL unset): the user's
            # rc files (pyenv init: ~200 ms) are no part of sshd's cost. SHLVL=1 makes bash skip them.
            "SetEnv SHLVL=1", *extra_config,
        ]) + "\n")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
        wait_listening(self.port, "sshd")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


class Target:
    """How an OpenSSH client reaches one side: direct sshd, or the gateway with a certificate."""

    def __init__(self, name: str, args: list[str], dest: str) -> None:
        self.name, self.args, self.dest = name, args, dest

    def argv(self, *options: str, command: str) -> list[str]:
        return ["ssh", *self.args, *options, self.dest, command]


def common_args(port: int, known_hosts: Path, cipher_args: list[str]) -> list[str]:
    return ["-F", "/dev/null", "-p", str(port), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "IgnoreUnknown=ObscureKeystrokeTiming",
            "-o", "ObscureKeystrokeTiming=no", "-o", "Compression=no", "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=no", *cipher_args]


class EchoProbe:
    """One `ssh -tt` to a `cat` on a raw, non-echoing pty: type a byte, time until cat's echo of it is back.

    Raw mode matters: on a cooked pty the terminal echoes each key and cat repeats the whole line after
    a newline, so some reads find a key that was already there and time nothing (measured: 15-25% of
    samples at 20-60 us on every target). Here every key comes back exactly once, through the program,
    as in an editor or tmux.
    """

    COMMAND = "stty raw -echo && printf ready && exec cat"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.samples: list[float] = []

    async def start(self) -> None:
        pipe = asyncio.subprocess.PIPE
        self.proc = await asyncio.create_subprocess_exec(*self.target.argv("-tt", command=self.COMMAND),
                                                         stdin=pipe, stdout=pipe, stderr=pipe)
        assert self.proc.stdout is not None
        await asyncio.wait_for(self.proc.stdout.readuntil(b"ready"), 30)

    async def type(self, ch: bytes) -> float:
        proc = self.proc
        assert proc.stdin and proc.stdout and proc.stderr
        start = time.perf_counter()
        proc.stdin.write(ch)
        await proc.stdin.drain()
        echo = await asyncio.wait_for(proc.stdout.read(256), 10)
        elapsed = time.perf_counter() - start
        if echo != ch:
            tail = (await proc.stderr.read()).decode()[-300:] if not echo else ""
            raise RuntimeError(f"{self.target.name}: typed {ch!r}, got {echo!r} {tail}")
        return elapsed

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()


async def echo_latency(targets: list[Target], samples: int) -> dict[str, list[float]]:
    """Interleave keystrokes across the targets so both see the same machine load."""
    probes = [EchoProbe(t) for t in targets]
    keys = [bytes((c,)) for c in range(ord("a"), ord("z") + 1)]
    try:
        for probe in probes:
            await probe.start()
        for i in range(samples):
            for probe in probes:
                probe.samples.append(await probe.type(keys[i % len(keys)]))
        return {p.target.name: p.samples for p in probes}
    finally:
        for probe in probes:
            await probe.stop()


def _drain(fd: int) -> tuple[int, float]:
    """Read a pipe to EOF in a thread with big reads; time from the first byte (setup excluded)."""
    first = os.read(fd, 1 << 20)
    start = time.perf_counter()
    got = len(first)
    while chunk := os.read(fd, 1 << 20):
        got += len(chunk)
    return got, time.perf_counter() - start


async def throughput(target: Target, nbytes: int) -> float:
    """Download `nbytes` of zeros (no compression) and return bytes per second."""
    proc = subprocess.Popen(target.argv(command=f"head -c {nbytes} /dev/zero"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    try:
        got, elapsed = await asyncio.to_thread(_drain, proc.stdout.fileno())
    finally:
        proc.stdout.close()
        proc.wait(10)
    if got != nbytes:
        raise RuntimeError(f"{target.name}: got {got} of {nbytes} bytes")
    return nbytes / elapsed


async def setup_time(target: Target, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*target.argv(command="true"), stdin=asyncio.subprocess.DEVNULL)
        if await proc.wait() != 0:
            raise RuntimeError(f"{target.name}: ssh true failed")
        out.append(time.perf_counter() - start)
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def hold_sessions(work: Path, n: int, client_key: asyncssh.SSHKey, cert: asyncssh.SSHCertificate,
                        settings: Settings, uvloop: bool, *, heap: bool = False,
                        tree: Path | None = None, idle_s: float = IDLE_S) -> dict[str, Any]:
    """Fresh gateway + idle runner; attach n pty sessions with asyncssh clients; measure gateway RSS.

    `heap`: the gateway traces its heap (bench/heap_profile.py; RSS then counts tracemalloc's own
    tables, so read the RSS of a run without it) and the result carries the top allocation sites per
    session. `tree`: run the gateway from that checkout (its bench/gateway_roles.py must take the same
    arguments), for an A/B against another commit in the same hour."""
    runner_key = work / "runner_host"
    if not runner_key.exists():
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(runner_key)
    runner_pub = asyncssh.read_private_key(runner_key).export_public_key().decode().strip()
    heap_out = work / "heap.json"
    heap_out.unlink(missing_ok=True)
    host_key = asyncssh.read_private_key(settings.data_dir / "keys" / "gateway_host_ed25519")
    known = ([host_key.convert_to_public()], [], [])
    conns: list[asyncssh.SSHClientConnection] = []
    children = [Child("--serve-idle-runner", str(runner_key), wait=False)]
    try:
        gw = gateway_to(children[0], runner_pub, settings.data_dir, *(["--uvloop"] if uvloop else []),
                        *(["--tracemalloc", str(heap_out)] if heap else []), tree=tree)
        children.append(gw)
        for child in children:
            child.ready()
        await asyncio.sleep(0.5)
        base = gw.rss_kib()
        sem = asyncio.Semaphore(50)

        async def one() -> None:
            async with sem:
                conn = await asyncssh.connect("127.0.0.1", gw.port, username=SESSION,
                                              client_keys=[(client_key, cert)], known_hosts=known, config=None,
                                              agent_path=None, encryption_algs=["aes128-gcm@openssh.com"])
                proc = await conn.create_process(term_type="xterm", encoding=None)
                await asyncio.wait_for(proc.stdout.readuntil(b"ready"), 30)
                conns.append(conn)

        start = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        attach_s = time.perf_counter() - start
        failures = [r for r in results if isinstance(r, BaseException)]
        await asyncio.sleep(1.0)
        soon = gw.rss_kib()
        # Idle means idle: what the gateway lets go of after a quiet spell (its kept AES-GCM contexts, after
        # one or two of gateway.splice's IDLE_SWEEP_S) is not held by an idle session.
        await asyncio.sleep(max(0.0, idle_s - 1.0))
        held = gw.rss_kib()
        report: dict[str, Any] = {
            "sessions": len(conns), "failed": len(failures), "attach_all_s": attach_s,
            **({"first_failure": repr(failures[0])} if failures else {}),
            "rss_base_mib": base / 1024, "rss_held_mib": held / 1024, "idle_s": idle_s,
            "rss_per_session_kib": (held - base) / max(1, len(conns)),
            "rss_per_session_kib_after_1s": (soon - base) / max(1, len(conns))}
        if heap:
            from bench import heap_profile

            gw.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 300
            while not heap_out.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            report["heap"] = heap_profile.per_session(json.loads(heap_out.read_text()), max(1, len(conns)))
        return report
    finally:
        for conn in conns:
            conn.close()
        stop_all(children)


def bench_credentials(work: Path, settings: Settings) -> tuple[Any, Any, Any, Any]:
    """The platform's CA and signing key, the gateway's client and host keys, and a user's key with a
    session certificate written to ``work/id`` and ``work/id-cert.pub`` (what `orz cloud attach` gives)."""
    from gateway import keys as gw_keys

    ca = ssh_ca.load_or_create_ca(settings)
    attach_jwt.load_or_create_signing_key(settings)
    gw_client = gw_keys.load_or_create(gw_keys.client_key_path(settings), "bench-gw")
    gw_host = gw_keys.load_or_create(gw_keys.host_key_path(settings), "bench-gw-host")
    user = asyncssh.generate_private_key("ssh-ed25519")
    user.write_private_key(work / "id")
    (work / "id").chmod(0o600)
    signed = ssh_ca.sign_user_certificate(ca, user.export_public_key().decode(), session_id=SESSION,
                                          user_id=USER, ttl_s=CERT_TTL_S)
    (work / "id-cert.pub").write_text(signed.text + "\n")
    return gw_client, gw_host, user, signed

async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="orz-bench-"))
    sshd: Sshd | None = None
    gw: Child | None = None
    slow: Child | None = None
    try:
        settings = Settings(data_dir=work / "gw")
        gw_client, gw_host, user, signed = bench_credentials(work, settings)
        sshd = Sshd(work, [user.export_public_key().decode().strip(),
                           gw_client.export_public_key().decode().strip()])
        sshd_pub = sshd.host_key.export_public_key().decode().strip()
        sshd_port = sshd.port

        def gateway_child(*extra: str) -> Child:
            return Child("--serve-gateway", str(settings.data_dir), "127.0.0.1", str(sshd_port), sshd_pub,
                         "--upstream-user", getpass.getuser(), *(["--uvloop"] if args.uvloop else []), *extra)

        gw = gateway_child()
        # The same gateway with its fast path off (every packet through asyncssh's channels), for the
        # fast path's own gain measured in the same run.
        slow = gateway_child("--no-fast-path")
        known = work / "known_hosts"
        gw_pub = gw_host.export_public_key().decode().strip()
        known.write_text(f"[127.0.0.1]:{sshd.port} {sshd_pub}\n[127.0.0.1]:{gw.port} {gw_pub}\n"
                         f"[127.0.0.1]:{slow.port} {gw_pub}\n")
        # Same cipher on both sides unless asked otherwise: the gateway offers AES-GCM only, while
        # OpenSSH would pick ChaCha20-Poly1305 with sshd, which is not the gateway's doing.
        ciphers = [] if args.client_default_ciphers else ["-o", "Ciphers=aes128-gcm@openssh.com"]
        direct = Target("direct", [*common_args(sshd.port, known, ciphers), "-i", str(work / "id")],
                        f"{getpass.getuser()}@127.0.0.1")
        cert_args = ["-i", str(work / "id"), "-o", f"CertificateFile={work / 'id-cert.pub'}"]
        via = Target("gateway", [*common_args(gw.port, known, ciphers), *cert_args], f"{SESSION}@127.0.0.1")
        via_slow = Target("gateway_asyncssh_path", [*common_args(slow.port, known, ciphers), *cert_args],
                          f"{SESSION}@127.0.0.1")
        report: dict[str, Any] = {"bytes": args.bytes, "samples": args.samples, "client_ciphers": ciphers[1:],
                                  "gateway_loop": "uvloop" if args.uvloop else "asyncio"}
        cpu_before = {"gateway": gw.cpu_split_s(), "gateway_asyncssh_path": slow.cpu_split_s()}
        echoes = await echo_latency([direct, via, via_slow], args.samples)
        # The gateway's own CPU per keystroke echo: steadier than latency on a shared machine. System
        # time is mostly the kernel's loopback TCP work for the gateway's two sends, the same either way.
        for name, child in (("gateway", gw), ("gateway_asyncssh_path", slow)):
            user_s, system_s = (now - then for now, then in zip(child.cpu_split_s(), cpu_before[name], strict=True))
            report[f"{name}_cpu_us_per_echo"] = (user_s + system_s) / args.samples * 1e6
            report[f"{name}_user_cpu_us_per_echo"] = user_s / args.samples * 1e6
        for name, lat in echoes.items():
            report[f"{name}_echo_p50_ms"] = statistics.median(lat) * 1000
            report[f"{name}_echo_p99_ms"] = pct(lat, 99) * 1000
        for t in (direct, via, via_slow):
            report[f"{t.name}_throughput_mib_s"] = await throughput(t, args.bytes) / (1 << 20)
        for t in (direct, via):
            report[f"{t.name}_setup_ms"] = statistics.median(await setup_time(t, args.setup_runs)) * 1000
        gw.stop()
        gw = None
        slow.stop()
        slow = None
        report["ratio_echo_p50"] = report["gateway_echo_p50_ms"] / report["direct_echo_p50_ms"]
        report["ratio_echo_p99"] = report["gateway_echo_p99_ms"] / report["direct_echo_p99_ms"]
        report["ratio_throughput"] = report["gateway_throughput_mib_s"] / report["direct_throughput_mib_s"]
        report["ratio_setup"] = report["gateway_setup_ms"] / report["direct_setup_ms"]
        report["asyncssh_path_ratio_echo_p50"] = report["gateway_asyncssh_path_echo_p50_ms"] / report[
            "direct_echo_p50_ms"]
        report["asyncssh_path_ratio_throughput"] = report["gateway_asyncssh_path_throughput_mib_s"] / report[
            "direct_throughput_mib_s"]
        if args.sessions:
            cert = asyncssh.import_certificate(signed.text)
            report["held"] = await hold_sessions(work, args.sessions, user, cert, settings, args.uvloop)
        return report
    finally:
        for child in (gw, slow):
            if child is not None:
                child.stop()
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_size, default=1 << 30, help="bulk transfer size (default 1G)")
    parser.add_argument("--samples", type=int, default=2000, help="keystrokes timed per side")
    parser.add_argument("--setup-runs", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions held (0 skips)")
    parser.add_argument("--asyncio", dest="uvloop", action="store_false",
                        help="run the gateway on asyncio's own loop (default: uvloop, as `orz gateway` does)")
    parser.add_argument("--client-default-ciphers", action="store_true",
                        help="let ssh pick its default cipher per side (default: aes128-gcm on both)")
    args = parser.parse_args()
    report = asyncio.run(main(args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
