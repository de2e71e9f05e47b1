"""Faults the soak injects on a schedule, each with a probe that says when the platform works again."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from soak_platform import SoakPlatform, http_get
from soak_users import OpFailed, Recorder, SshUser

RECOVERY_LIMIT_S = 120.0  # a fault not recovered by then is reported as not recovered
RECOVERY_TARGET_S = 30.0  # the target
GRACE_S = 5.0  # after recovery, operations still count as inside the fault's window
CERT_VALID_S = 300.0  # an attach certificate's lifetime (the API's; the probes' config never refreshes it)
UPLOAD_START_LIMIT_S = 60.0  # client-vanishes: how long its upload may take to get under way
# The faults whose probes ssh to the canary (they need its certificate fresh).
CANARY_PROBED = frozenset({"kill-gateway", "kill-api", "kill-server", "kill-runner", "client-vanishes"})
# The vanishing client's upload rate (scp -l, Kbit/s): 64 MiB then takes a minute, so it is still going
# when it is killed, however slowly the machine runs.
VANISH_RATE_KBIT = 8192
# A probe's command prints this and the session's clock: when the platform served it, not when a slow
# client got round to reporting it.
# True (or the time the platform served it) once the platform works again; any falsy value or exception: not yet.
Probe = Callable[[], "bool | float | None"]
SERVED = re.compile(r"served-at (\d+(?:\.\d+)?)")
FAULTS = ("kill-gateway", "kill-api", "kill-scheduler", "kill-runner", "pg-terminate", "disk-full",
          "client-vanishes")
# `orz server` runs the three in one process: one kill -9 for all of them.
SERVER_FAULTS = ("kill-server", *FAULTS[3:])
# On the Kubernetes rehearsal: kill -9 of a gateway's, an API's and a session Pod's container (the kubelet
# restarts it), the scheduler's Pod deleted (its Deployment replaces it), the platform's connections
# terminated in the chart's PostgreSQL (psql by exec). No disk-full: a session's volume is the cluster's.
REHEARSAL_FAULTS = ("kill-gateway", "kill-api", "kill-scheduler", "kill-runner", "pg-terminate", "client-vanishes")


@dataclass
class Fault:
    kind: str
    start: float
    detail: str = ""
    recovered_at: float | None = None
    error: str = ""

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.start

    @property
    def window(self) -> tuple[float, float]:
        end = self.recovered_at if self.recovered_at is not None else self.start + RECOVERY_LIMIT_S
        return self.start, end + GRACE_S


@dataclass
class Injector:
    """The operator's side: a canary session (its own user) and the faults, one after another."""

    platform: SoakPlatform
    rec: Recorder
    stop: threading.Event
    ops: SshUser
    faults: list[Fault] = field(default_factory=list)
    canary: str | None = None
    disk_canary: str | None = None
    probe_config: str | None = None
    disk_error: str = ""
    certificates: dict[str, float] = field(default_factory=dict)  # session -> when its probes' cert was fetched
    mounts: list[Path] = field(default_factory=list)

    def prepare(self, kinds: Sequence[str] = ()) -> None:
        """The canaries, before the run: the faults then fit a short run one after another."""
        self.canary = self._new_session()
        self.probe_config = self._probe_ssh_config()
        self._fresh_certificate(self.canary)
        if "disk-full" in kinds:
            # Most of a minute on a busy machine, which pushed the last fault past the end of a 120 s run.
            try:
                self._fresh_certificate(self._small_disk_session())
            except Exception as exc:  # said when the fault's turn comes, as any fault that cannot be set up
                self.disk_error = f"{type(exc).__name__}: {exc}"[:300]

    def _probe_ssh_config(self) -> str:
        """The operator's ssh config without its `Match exec "... _refresh-cert %n"`: each `ssh <id>.orz`
        runs the CLI to check the certificate, a Python start that took 10-15 s per ssh on the soak's
        machine at load 20. A probe times the platform (TCP, SSH, the gateway's authorize, the runner), so
        it uses a certificate fetched before the fault (_fresh_certificate) and skips that step."""
        text = (self._orz_dir() / "ssh_config").read_text()
        text, n = re.subn(r'^(Match host \S+) exec ".*"$', r"\1", text, flags=re.MULTILINE)
        if n != 1:
            raise RuntimeError("the operator's ssh_config has no `Match host ... exec` line to take out")
        path = self.ops.home / ".ssh" / "probe_config"
        path.write_text(text)
        return str(path)

    def _orz_dir(self) -> Path:
        return Path(self.ops.env["XDG_CONFIG_HOME"]) / "orzbob"

    def _fresh_certificate(self, sid: str) -> None:
        """A new certificate for ``sid`` for the probes, unless the last one outlasts a fault's recovery
        limit (a fetch is a CLI start: seconds on a busy machine, which would push the later faults past
        the end of a short run)."""
        age = time.monotonic() - self.certificates.get(sid, -CERT_VALID_S)
        if age < CERT_VALID_S - RECOVERY_LIMIT_S - UPLOAD_START_LIMIT_S:
            return
        (self._orz_dir() / "hosts" / f"{sid}.conf").unlink(missing_ok=True)  # makes _refresh-cert fetch
        done = self.ops.orz("cloud", "_refresh-cert", f"{sid}.orz")
        if done.returncode != 0:
            raise OpFailed(f"no certificate for the probes: {done.stderr.strip()[-200:]}")
        self.certificates[sid] = time.monotonic()

    def _new_session(self) -> str:
        # Its program writes to the pane every few seconds: output is activity, so the reaper leaves it be.
        made = self.ops.orz("cloud", "new", "--no-attach", "--wait", "--timeout", "150", "--repo",
                            self.platform.fixture_url, "--branch", "main", "--secrets", "soak",
                            "--program", "sh -c 'while sleep 3; do echo tick; done'", "canary")
        for word in made.stdout.split():
            if word.startswith("fixture-"):
                return word
        raise RuntimeError(f"the canary session did not start: {made.stderr.strip()[-300:]}")

    def inject(self, kind: str) -> Fault:
        fault = Fault(kind, time.time())
        self.faults.append(fault)
        print(f"soak: {time.strftime('%H:%M:%S')} fault {kind}", flush=True)
        try:
            if self.canary and kind in CANARY_PROBED:
                self._fresh_certificate(self.canary)
                fault.start = time.time()
            probe = getattr(self, "_" + kind.replace("-", "_"))(fault)
        except Exception as exc:  # the fault could not be set up: say so in the report
            fault.error = f"{type(exc).__name__}: {exc}"[:300]
            print(f"soak: fault {kind} could not be injected: {fault.error}", flush=True)
            return fault
        deadline = fault.start + RECOVERY_LIMIT_S
        last = ""
        while time.time() < deadline:
            try:
                served = probe()
                if served:
                    # A probe that says when the platform served it is taken at its word (a slow client
                    # reporting late is not the platform recovering late); any other, when it returned.
                    at = time.time() if served is True else float(served)
                    fault.recovered_at = min(max(at, fault.start), time.time())
                    break
            except Exception as exc:  # any failure of the probe is "not yet"
                last = f"{type(exc).__name__}: {exc}"[:300]
            time.sleep(1.0)  # a user retrying, not a flood
        if fault.recovered_at is None:
            fault.error = fault.error or f"not recovered in {RECOVERY_LIMIT_S:.0f}s (last probe: {last})"
        print(f"soak: {time.strftime('%H:%M:%S')} fault {kind}: "
              + (f"recovered in {fault.recovery_s:.1f}s" if fault.recovery_s is not None else fault.error),
              flush=True)
        return fault

    # -- probes -----------------------------------------------------------------------------------

    def _ssh_ok(self, sid: str | None = None) -> float | None:
        """A new connection runs a command: the session's clock when it did, None if it did not."""
        return self._served(sid or self.canary or "", "true")

    def _served(self, sid: str, command: str) -> float | None:
        """Run ``command`` over a new connection (the probes' config); when it succeeded, the session's clock
        right after it (the same clock as ours: the sessions run on this machine, or its cluster's node)."""
        out = self.ops.ssh_exec(sid, f"{command} && echo served''-at $(date +%s.%N)", timeout=30,
                                config=self.probe_config)
        match = SERVED.search(out)
        return float(match.group(1)) if match else None

    def _api_ok(self) -> bool:
        status, body = http_get(f"{self.platform.api_url}/v1/instances", self.platform.admin_token)
        return status == 200 and b"instances" in body

    # -- the faults -------------------------------------------------------------------------------

    def _kill_gateway(self, fault: Fault) -> Probe:
        fault.detail = self.platform.restart("gateway")
        return self._ssh_ok

    def _kill_api(self, fault: Fault) -> Probe:
        fault.detail = self.platform.restart("api")
        return lambda: self._api_ok() and self._ssh_ok()

    def _kill_server(self, fault: Fault) -> Probe:
        """`orz server` killed -9 and started again: API, gateway and scheduler at once."""
        fault.detail = self.platform.restart("server")
        return lambda: self._api_ok() and self._ssh_ok()

    def _kill_scheduler(self, fault: Fault) -> Probe:
        fault.detail = self.platform.restart("scheduler")
        return self.platform.scheduler_leader

    def _kill_runner(self, fault: Fault) -> Probe:
        """kill -9 the canary's runner: the next ssh must bring it back."""
        fault.detail = self.platform.kill_session(str(self.canary))
        return self._ssh_ok

    def _pg_terminate(self, fault: Fault) -> Probe:
        fault.detail = self.platform.terminate_db()
        return lambda: self._api_ok() and self._api_ok()

    def _disk_full(self, fault: Fault) -> Probe:
        """A workspace on a 32 MiB tmpfs, filled to ENOSPC from inside the session."""
        if self.disk_error:
            raise OpFailed(self.disk_error)
        sid = self.disk_canary or self._small_disk_session()
        self._fresh_certificate(sid)
        fault.start = time.time()
        with contextlib.suppress(OpFailed):
            # The window starts when the disk is full (the session's clock after dd), not with the preparation
            # nor with the ssh that fills it.
            filled = self._served(sid, "dd if=/dev/zero of=fill bs=1M count=64 2>/dev/null; df -h . | tail -1")
            fault.start = filled or time.time()
        fault.detail = f"{sid}'s workspace (tmpfs 32 MiB) filled"

        def probe() -> float | None:
            # With the disk full, the user can still get in, free space and write again; then a new connection
            # works as usual.
            if self._served(sid, "rm -f fill && echo probe > .soak-probe && grep -q probe .soak-probe") is None:
                return None
            return self._ssh_ok(sid)

        return probe

    def _small_disk_session(self) -> str:
        """A running session whose workspace is a 32 MiB tmpfs (stopped, moved onto it, started again)."""
        sid = self.disk_canary = self._new_session()
        if self.ops.orz("cloud", "stop", sid).returncode != 0:
            raise OpFailed("could not stop the disk canary")
        self.ops.wait_status(sid, {"stopped"}, 60)
        workspace = self.platform.data / "sessions" / sid / "workspace"
        kept = workspace.with_name("workspace.kept")
        workspace.rename(kept)
        workspace.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(workspace)], check=True)
        self.mounts.append(workspace)
        subprocess.run(["cp", "-a", f"{kept}/.", str(workspace)], check=True)
        subprocess.run(["chown", "--reference", str(kept), str(workspace)], check=True)
        subprocess.run(["chmod", "--reference", str(kept), str(workspace)], check=True)
        subprocess.run(["rm", "-rf", str(kept)], check=True)
        if self.ops.orz("cloud", "start", sid).returncode != 0:
            raise OpFailed("could not start the disk canary on its small disk")
        self.ops.wait_status(sid, {"running"}, 120)
        return sid

    def _client_vanishes(self, fault: Fault) -> Probe:
        """scp of 64 MiB killed -9 (with its ssh) mid-transfer; the gateway must let go of it and serve the
        next one."""
        sid = str(self.canary)
        big = self.ops.home / "big.bin"
        if not big.exists():
            with big.open("wb") as out:
                out.write(os.urandom(64 * 1024 * 1024))
        # Its own process group: the kill takes scp's ssh too, so the connection drops as a vanished laptop's
        # would (killing scp alone lets its ssh see end-of-input and close the channel politely).
        scp = subprocess.Popen(["scp", "-q", "-l", str(VANISH_RATE_KBIT), "-F", str(self.probe_config), str(big),
                                f"{sid}.orz:big.bin"], env=self.ops.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            received = self._wait_for_upload(sid, scp)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(scp.pid, signal.SIGKILL)
            scp.wait()
        fault.start = time.time()
        fault.detail = f"scp killed -9 with its ssh, {received // 1024} KiB into a 64 MiB upload"
        url = self.platform.metrics_url("gateway")

        def probe() -> bool:
            attached = [line for line in http_get(url)[1].decode().splitlines()
                        if line.startswith("orz_active_sessions{") and 'door="ssh"' in line]
            # The killed client's bridge is gone when nothing else of ours is attached over SSH at the moment
            # the probe runs; users may be attached, so accept a fresh transfer working as the criterion too.
            return bool(attached) and self.ops.scp_probe(sid, config=self.probe_config)

        return probe

    def _wait_for_upload(self, sid: str, scp: subprocess.Popen[bytes], limit_s: float = UPLOAD_START_LIMIT_S) -> int:
        """Bytes of big.bin in the session once the upload is under way (a kill before that tests nothing)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if scp.poll() is not None:
                raise OpFailed(f"scp ended (exit {scp.returncode}) before it could be killed mid-transfer")
            with contextlib.suppress(OpFailed, subprocess.TimeoutExpired):
                out = self.ops.ssh_exec(sid, "stat -c %s big.bin 2>/dev/null || echo 0", timeout=20,
                                        config=self.probe_config)
                size = int((out.split() or ["0"])[-1])
                if size > 0:
                    return size
            time.sleep(0.5)
        raise OpFailed(f"the upload had not started after {limit_s:.0f} s")

    def cleanup(self) -> None:
        if self.disk_canary:
            # Its workspace is a mount point the platform cannot remove: stop it, unmount, then kill it.
            self.ops.orz("cloud", "stop", self.disk_canary)
            with contextlib.suppress(OpFailed):
                self.ops.wait_status(self.disk_canary, {"stopped"}, 60)
        for mount in self.mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        for sid in (self.canary, self.disk_canary):
            if sid:
                with contextlib.suppress(OpFailed):
                    self.ops.kill(sid)
