"""The soak's simulated users: people at a terminal (the real OpenSSH client, scp, -L, tmux), REST
automation and browser-door attaches. Every step is one timed operation in the Recorder."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pexpect
from soak_platform import SoakPlatform, free_port

SECRET_KEY = "SOAK_TOKEN"  # nosec B105  # the name of the secret's key, not a value
DATA_FILE = "soak-data.txt"
SABOTAGE_BOUND_S = 300.0
ANSI = re.compile(r"\x1b(\[[0-9;?>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][A-Za-z0-9]|[=>78DEHMcNO])")


class OpFailed(Exception):
    """A step did not do what a user expects; the message says what was seen."""


class SoakEnding(OpFailed):
    """The run is over while a step waited (for the reaper, say): not counted either way."""


@dataclass
class Op:
    name: str
    actor: str
    start: float
    end: float
    ok: bool
    error: str = ""


@dataclass
class Loss:
    what: str  # "workspace file", "scrollback marker", "secret"
    session: str
    detail: str
    at: float


@dataclass
class Recorder:
    """Every operation and every loss, from all threads."""

    ops: list[Op] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    verbose: bool = False

    @contextlib.contextmanager
    def op(self, name: str, actor: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        except SoakEnding:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            self._add(Op(name, actor, t0, time.time(), False, f"{type(exc).__name__}: {first}"[:300]))
            raise
        self._add(Op(name, actor, t0, time.time(), True))

    def _add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)
        if self.verbose or not op.ok:
            state = "ok" if op.ok else f"FAILED {op.error}"
            print(f"soak: {time.strftime('%H:%M:%S')} {op.actor} {op.name} {op.end - op.start:.2f}s {state}",
                  file=sys.stderr, flush=True)

    def lost(self, what: str, session: str, detail: str) -> None:
        with self.lock:
            self.losses.append(Loss(what, session, detail, time.time()))
        print(f"soak: LOST {what} in {session}: {detail}", file=sys.stderr, flush=True)


def screen(text: str) -> str:
    return ANSI.sub("", text)


class Actor(threading.Thread):
    """A simulated user's loop, stopped by ``stop``; a failed step abandons that session (killed)."""

    def __init__(self, name: str, platform: SoakPlatform, rec: Recorder, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.platform, self.rec, self.stop_event = platform, rec, stop
        self.sessions: set[str] = set()

    def sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds)

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()


class SshUser(Actor):
    """A person with the orz CLI and OpenSSH: the whole life of a session from a git repository."""

    def __init__(self, name: str, platform: SoakPlatform, rec: Recorder, stop: threading.Event,
                 sabotage: bool = False) -> None:
        super().__init__(name, platform, rec, stop)
        self.home, self.token = platform.add_user(name)
        self.env = platform.user_env(self.home)
        self.ssh_config = str(self.home / ".ssh" / "config")
        self.secret_value = f"secret-{secrets.token_hex(8)}"
        self.sabotage = sabotage  # remove the data file behind the user's back once: loss detection must see it
        # A sabotaging user goes on past the end of the run until it has done so (a fault may have failed its
        # first tries), within this bound: a run whose loss detection was never exercised proves nothing.
        self.sabotage_until = time.monotonic() + SABOTAGE_BOUND_S
        made = platform.orz("cloud", "secrets", "create", "soak", "--data", f"{SECRET_KEY}={self.secret_value}",
                            env=self.env)
        if made.returncode != 0:
            raise RuntimeError(f"secrets create for {name}: {made.stderr.strip()}")
        self.api = httpx.Client(base_url=platform.api_url, headers={"Authorization": f"Bearer {self.token}"},
                                timeout=15)

    def orz(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.platform.orz(*args, env=self.env, timeout=timeout)

    def run(self) -> None:
        while not self.stopping or (self.sabotage and time.monotonic() < self.sabotage_until):
            sid = None
            try:
                sid = self.create()
                self.lifecycle(sid)
            except (OpFailed, pexpect.ExceptionPexpect, subprocess.SubprocessError, httpx.HTTPError, OSError):
                self.sleep(2)
            finally:
                if sid is not None:
                    with contextlib.suppress(OpFailed):
                        self.kill(sid)

    def lifecycle(self, sid: str) -> None:
        marker = f"MARK-{secrets.token_hex(6)}"
        data = secrets.token_hex(16)
        with self.rec.op("attach", self.name):
            self.attach_and_write(sid, marker, data)
        if self.sabotage:
            self.ssh_exec(sid, f"rm -f {DATA_FILE}")
            with self.rec.op("exec", self.name):
                self.check_data(sid, data, "after the soak removed it (--sabotage)")
            self.sabotage = False
            return
        with self.rec.op("scp", self.name):
            self.scp_round_trip(sid)
        with self.rec.op("exec", self.name):
            self.check_data(sid, data, "after attach and scp")
        with self.rec.op("forward", self.name):
            self.forward(sid)
        if self.stopping:
            return
        with self.rec.op("idle-reaped", self.name):
            self.wait_status(sid, {"stopped"}, timeout=self.platform.idle_timeout_s + 60)
        with self.rec.op("wake", self.name):
            self.wake_and_check(sid, marker, data)
        if self.stopping:
            return
        with self.rec.op("stop-start", self.name):
            if self.orz("cloud", "stop", sid).returncode != 0:
                raise OpFailed("orz cloud stop failed")
            self.wait_status(sid, {"stopped"}, timeout=60)
            started = self.orz("cloud", "start", sid)
            if started.returncode != 0:
                raise OpFailed(f"orz cloud start: {started.stderr.strip()[-200:]}")
            self.wait_status(sid, {"running"}, timeout=120)
        with self.rec.op("exec", self.name):
            self.check_data(sid, data, "after stop/start")

    def check_data(self, sid: str, data: str, when: str) -> None:
        out = self.ssh_exec(sid, f"cat {DATA_FILE} 2>&1 || true")
        if data not in out:
            self.rec.lost("workspace file", sid, f"{DATA_FILE} {when}: {out.strip()[:80]!r}")

    # -- steps ------------------------------------------------------------------------------------

    def create(self) -> str:
        with self.rec.op("create", self.name):
            made = self.orz("cloud", "new", "--no-attach", "--wait", "--timeout", "150", "--repo",
                            self.platform.fixture_url, "--branch", "main", "--secrets", "soak",
                            "--program", "bash --norc --noprofile", "soak")
            match = re.search(r"session (\S+) created", made.stdout)
            if match:
                self.sessions.add(match.group(1))
            if made.returncode != 0 or not match:
                if match:
                    self.kill(match.group(1))
                said = [line for line in (made.stderr or made.stdout).splitlines() if line.strip()] or [""]
                raise OpFailed(f"orz cloud new exited {made.returncode}: {said[-1][-300:]}")
            return match.group(1)

    def terminal(self, sid: str) -> pexpect.spawn:
        child = pexpect.spawn("ssh", ["-F", self.ssh_config, "-tt",
                                      f"{sid}.orz"], env=self.env, encoding="utf-8", timeout=60,
                              dimensions=(40, 120))
        try:
            child.expect(r"\[main\]")  # tmux's status line: typing before it may be lost
        except pexpect.ExceptionPexpect as exc:
            child.close(force=True)
            raise OpFailed(f"no tmux after ssh {sid}.orz ({type(exc).__name__}); it showed "
                           f"{screen(str(child.before))[-200:]!r}") from None
        time.sleep(0.3)
        return child

    def see(self, child: pexpect.spawn, command: str, pattern: str, timeout: float = 20) -> str:
        child.sendline(command)
        try:
            child.expect(pattern, timeout=timeout)
        except pexpect.ExceptionPexpect as exc:
            raise OpFailed(f"typed {command[:40]!r}, wanted /{pattern}/ ({type(exc).__name__}); the terminal "
                           f"showed {screen(str(child.before))[-200:]!r}") from None
        return str(child.match.group(0)) if child.match else ""

    def detach(self, child: pexpect.spawn) -> None:
        child.send("\x02d")
        child.expect(pexpect.EOF, timeout=20)
        child.close()

    def attach_and_write(self, sid: str, marker: str, data: str) -> None:
        child = self.terminal(sid)
        try:
            self.see(child, "cat .soak-init | tr a-z A-Z", "INIT RAN")
            self.see(child, "echo ON''ATTACH=$(grep -c attached .soak-onattach)", r"ONATTACH=[1-9]")
            # Typed as SE''C so that only the output, not the echo of the typing, matches.
            seen = self.see(child, f'echo SE\'\'C="${SECRET_KEY}/$SOAK_SECRET"', r"SEC=\S*/\S*")
            if seen != f"SEC={self.secret_value}/{self.secret_value}":
                # SEC=/... : the variable is unset in the session: the secret is lost to the user.
                self.rec.lost("secret", sid, f"on first attach saw {seen!r}")
            # The marker is typed split so only the command's output can match it.
            self.see(child, f"echo {marker[:4]}''{marker[4:]}", marker)
            self.see(child, f"echo {data} > {DATA_FILE} && sync && echo wr''ote", "wrote")
            self.detach(child)
        finally:
            child.close(force=True)

    def wake_and_check(self, sid: str, marker: str, data: str) -> None:
        child = self.terminal(sid)  # wake on connect: ssh to a stopped session starts it
        try:
            got = self.see(child, f'echo DA\'\'TA="$(head -c 60 {DATA_FILE} 2>&1)"', r"DATA=[^\r\n]*")
            if data not in got:
                self.rec.lost("workspace file", sid, f"{DATA_FILE} after idle stop and wake: {got[:80]!r}")
            typed = f"{marker[:4]}''{marker[4:]}"
            count = self.see(child, f"echo FOUND=$(tmux capture-pane -p -S - -E - | grep -c {typed})", r"FOUND=\d+")
            if count == "FOUND=0":
                self.rec.lost("scrollback marker", sid, f"{marker} not in the pane's scrollback after wake")
            seen = self.see(child, f'echo SE\'\'C="${SECRET_KEY}"', r"SEC=\S*")
            if seen != f"SEC={self.secret_value}":
                self.rec.lost("secret", sid, f"after wake saw {seen!r}")
            self.detach(child)
        finally:
            child.close(force=True)

    def ssh_exec(self, sid: str, command: str, timeout: float = 60, config: str | None = None) -> str:
        done = subprocess.run(["ssh", "-F", config or self.ssh_config, f"{sid}.orz", command], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise OpFailed(f"ssh {command!r} exited {done.returncode}: {done.stderr.strip()[-200:]}")
        return done.stdout

    def scp_round_trip(self, sid: str, size: int = 256 * 1024) -> None:
        work = self.home / "scp"
        work.mkdir(exist_ok=True)
        up, down = work / "up.bin", work / "down.bin"
        up.write_bytes(os.urandom(size))
        down.unlink(missing_ok=True)
        for argv in (["scp", "-q", "-F", self.ssh_config, str(up), f"{sid}.orz:up.bin"],
                     ["scp", "-q", "-F", self.ssh_config, f"{sid}.orz:up.bin", str(down)]):
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise OpFailed(f"scp exited {done.returncode}: {done.stderr.strip()[-200:]}")
        if hashlib.sha256(up.read_bytes()).digest() != hashlib.sha256(down.read_bytes()).digest():
            raise OpFailed("the file scp brought back differs from the one sent")

    def scp_probe(self, sid: str, config: str | None = None) -> bool:
        """A small scp up works (the probe after a client vanished mid-transfer)."""
        probe = self.home / "probe.txt"
        probe.write_text("probe\n")
        done = subprocess.run(["scp", "-q", "-F", config or self.ssh_config, str(probe), f"{sid}.orz:probe.txt"],
                              env=self.env, capture_output=True, text=True, timeout=30, check=False)
        return done.returncode == 0

    def forward(self, sid: str) -> None:
        """-L to the session's redis service (PING must answer PONG), or, where the fixture has no service,
        to a web server the user starts on the session's loopback (GET must answer 200)."""
        port = free_port()
        if self.platform.session_service:
            remote, ask, want = 6379, b"PING\r\n", b"+PONG"
        else:
            remote, ask, want = 8765, b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200"
            self.ssh_exec(sid, f"nohup python3 -m http.server {remote} --bind 127.0.0.1 >/dev/null 2>&1 &")
        tunnel = subprocess.Popen(["ssh", "-F", self.ssh_config, "-N", "-o", "ExitOnForwardFailure=yes",
                                   "-L", f"127.0.0.1:{port}:127.0.0.1:{remote}", f"{sid}.orz"], env=self.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                        sock.sendall(ask)
                        answer = sock.recv(64)
                    if answer.startswith(want):
                        return
                    if not answer and time.monotonic() < deadline:
                        raise OSError("closed before answering")  # the server inside is not listening yet
                    raise OpFailed(f"port {remote} through -L answered {answer!r}")
                except OSError:
                    if tunnel.poll() is not None or time.monotonic() > deadline:
                        raise OpFailed("the -L tunnel did not open") from None
                    time.sleep(0.3)
        finally:
            tunnel.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                tunnel.wait(timeout=10)
            if tunnel.poll() is None:
                tunnel.kill()
                tunnel.wait()
            if tunnel.stderr:
                tunnel.stderr.close()

    def wait_status(self, sid: str, wanted: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            try:
                resp = self.api.get(f"/v1/instances/{sid}")
                status = resp.json().get("status", f"HTTP {resp.status_code}") if resp.status_code == 200 \
                    else f"HTTP {resp.status_code}"
            except (httpx.HTTPError, ValueError):
                status = "unreachable"
            if status in wanted:
                return status
            if status in ("failed", "deleted") and status not in wanted:
                raise OpFailed(f"session {sid} is {status}")
            self.sleep(1)
            if self.stopping and "stopped" in wanted:
                raise SoakEnding("soak ending")
        raise OpFailed(f"session {sid} still {status} after {timeout:.0f}s (wanted {sorted(wanted)})")

    def kill(self, sid: str, attempts: int = 3) -> None:
        """orz cloud kill --force, tried again a few seconds later as a user would (one op, all tries)."""
        with self.rec.op("kill", self.name):
            for attempt in range(attempts):
                done = self.orz("cloud", "kill", "--force", sid)
                if done.returncode == 0 or "not found" in (done.stderr + done.stdout).lower():
                    self.sessions.discard(sid)
                    return
                if attempt < attempts - 1:
                    time.sleep(5)
            raise OpFailed(f"orz cloud kill exited {done.returncode}: {done.stderr.strip()[-200:]}")


class RestUser(Actor):
    """Automation through the REST API: create, list, status, delete, over and over."""

    def __init__(self, name: str, platform: SoakPlatform, rec: Recorder, stop: threading.Event) -> None:
        super().__init__(name, platform, rec, stop)
        _, token = platform.add_user(name)
        self.api = httpx.Client(base_url=platform.api_url, headers={"Authorization": f"Bearer {token}"},
                                timeout=15)

    def run(self) -> None:
        while not self.stopping:
            sid = None
            try:
                with self.rec.op("rest-create", self.name):
                    resp = self.api.post("/v1/instances", json={"program": "sleep 100000", "task": "soak"})
                    if resp.status_code != 201:
                        raise OpFailed(f"POST /v1/instances: {resp.status_code} {resp.text[:200]}")
                    sid = resp.json()["id"]
                    self.sessions.add(sid)
                    self.wait_running(sid)
                with self.rec.op("rest-list", self.name):
                    listed = self.api.get("/v1/instances")
                    if listed.status_code != 200 or sid not in {i["id"] for i in listed.json()["instances"]}:
                        raise OpFailed(f"GET /v1/instances: {listed.status_code} without {sid}")
                with self.rec.op("rest-status", self.name):
                    status = self.api.get(f"/v1/instances/{sid}/status")
                    if status.status_code != 200:
                        raise OpFailed(f"GET status: {status.status_code} {status.text[:200]}")
                self.sleep(2)
            except (OpFailed, httpx.HTTPError, KeyError, ValueError):
                self.sleep(2)
            finally:
                if sid is not None:
                    self.delete(sid)

    def wait_running(self, sid: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            resp = self.api.get(f"/v1/instances/{sid}")
            status = resp.json().get("status", "?") if resp.status_code == 200 else f"HTTP {resp.status_code}"
            if status == "running":
                return
            if status in ("failed", "deleted"):
                raise OpFailed(f"{sid} is {status}")
            time.sleep(0.5)
        raise OpFailed(f"{sid} still {status} after {timeout:.0f}s")

    def delete(self, sid: str) -> None:
        try:
            with self.rec.op("rest-delete", self.name):
                resp = self.api.delete(f"/v1/instances/{sid}", params={"force": "true"})
                if resp.status_code not in (200, 202, 204, 404):
                    raise OpFailed(f"DELETE: {resp.status_code} {resp.text[:200]}")
                self.sessions.discard(sid)
        except (OpFailed, httpx.HTTPError):
            pass


class WebUser(Actor):
    """The browser terminal: a WebSocket attach to one session, typing and reading, again and again."""

    def __init__(self, name: str, platform: SoakPlatform, rec: Recorder, stop: threading.Event) -> None:
        super().__init__(name, platform, rec, stop)
        self.rest = RestUser(name, platform, rec, stop)

    def run(self) -> None:
        sid = None
        while not self.stopping:
            try:
                if sid is None:
                    with self.rec.op("rest-create", self.name):
                        resp = self.rest.api.post("/v1/instances",
                                                  json={"program": "bash --norc --noprofile", "task": "web"})
                        if resp.status_code != 201:
                            raise OpFailed(f"POST /v1/instances: {resp.status_code} {resp.text[:200]}")
                        sid = resp.json()["id"]
                        self.sessions.add(sid)
                        self.rest.wait_running(sid)
                with self.rec.op("web-attach", self.name):
                    grant = self.rest.api.post(f"/v1/instances/{sid}/attach", json={})
                    if grant.status_code != 200:
                        raise OpFailed(f"attach grant: {grant.status_code} {grant.text[:200]}")
                    asyncio.run(self.browser(sid, str(grant.json()["token"])))
                self.sleep(3)
            except (OpFailed, httpx.HTTPError, OSError, KeyError, ValueError, TimeoutError):
                self.sleep(2)
            except Exception:  # websockets' own errors: the op above recorded it
                self.sleep(2)
        if sid is not None:
            self.rest.delete(sid)
            self.sessions.discard(sid)

    async def browser(self, sid: str, token: str) -> None:
        from websockets.asyncio.client import connect
        from websockets.typing import Subprotocol

        url = (f"{self.platform.web_url.replace('http', 'ws', 1)}/v1/instances/{sid}/attach"
               f"?token={token}&cols=100&rows=30")
        word = f"web{secrets.token_hex(4)}"
        async with connect(url, open_timeout=30, subprotocols=[Subprotocol("orz.terminal.v1")],
                           origin=self.platform.web_url) as ws:  # type: ignore[arg-type]
            seen = ""

            async def until(text: str) -> None:
                nonlocal seen
                async with asyncio.timeout(30):
                    while text not in seen:
                        msg = await ws.recv()
                        if isinstance(msg, bytes):
                            seen = screen(seen + msg.decode("utf-8", "replace"))[-20000:]

            await until("[main]")
            await asyncio.sleep(0.3)
            await ws.send(f"echo {word[:3]}''{word[3:]}\r".encode())
            await until(word)


def missing_tools() -> list[str]:
    return [tool for tool in ("ssh", "scp", "tmux", "git", "bwrap") if shutil.which(tool) is None]
