"""The soak's platforms: what users and faults need of the platform under test (``SoakPlatform``), and the
embedded one (``Platform``); hack/soak_rehearsal.py has the Kubernetes rehearsal's.

The embedded default's services (API, gateway, scheduler, local runners) as
separate processes on one data dir, so each can be killed -9 and started again as a supervisor would
(topology "split"), or `orz server` itself, all of them in one process (topology "server").

The database is SQLite in the data dir (what `orz server` uses) or a PostgreSQL database the soak creates
for itself on 127.0.0.1:5432 (so its connections can be terminated under the API).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
# The PostgreSQL server the soak makes its database on (as the tests find theirs).
PG_SERVER = os.environ.get("ORZ_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")
SERVICE_NAMES = ("api", "gateway", "scheduler")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answered."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:  # only the soak's own URLs come here; "" (nothing to ask) is status 0 as well
        request = urllib.request.Request(url, headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310  # nosec B310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


@dataclass
class Service:
    """One `orz <name>` process; started again after a kill -9, each start counted."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    health_url: str
    proc: subprocess.Popen[bytes] | None = None
    starts: list[float] = field(default_factory=list)  # wall-clock times of each (re)start

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until healthy; seconds it took."""
        t0 = time.time()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=out,
                                         start_new_session=True)
        self.starts.append(t0)
        if not wait_for(self.healthy, timeout):
            raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f}s; see {self.log}")
        return time.time() - t0

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        return http_get(self.health_url, timeout=2)[0] == 200

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SoakPlatform(Protocol):
    """What the soak's users, faults and report use of a platform, whichever way it runs."""

    data: Path  # where logs and the report go
    database: str
    idle_timeout_s: int
    admin_token: str
    fixture_url: str
    env: dict[str, str]
    # name -> something with .pid (of its main process, or None) and .starts (wall-clock times it started)
    services: dict[str, Any]
    fault_kinds: tuple[str, ...]
    # True: the fixture's session runs a redis service for -L; False: -L to a server the user starts
    session_service: bool

    @property
    def api_url(self) -> str: ...
    @property
    def web_url(self) -> str: ...
    def metrics_url(self, service: str) -> str: ...
    def orz(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]: ...
    def setup(self) -> None: ...
    def add_user(self, name: str) -> tuple[Path, str]: ...
    def user_env(self, home: Path) -> dict[str, str]: ...
    def restart(self, name: str) -> str: ...
    def kill_session(self, sid: str) -> str: ...
    def terminate_db(self) -> str: ...
    def scheduler_leader(self) -> bool: ...
    def leftovers(self) -> list[str]: ...
    def db_rows(self) -> dict[str, int]: ...
    def stop(self) -> None: ...
    def drop_database(self) -> None: ...


@dataclass
class Platform:
    base: Path
    database: str  # "sqlite" | "postgres"
    idle_timeout_s: int = 20
    topology: str = "split"  # "split": orz api, gateway, scheduler; "server": orz server
    data: Path = field(init=False)
    db_url: str = field(init=False)
    pg_db: str | None = field(init=False, default=None)
    ports: dict[str, int] = field(init=False, default_factory=dict)
    env: dict[str, str] = field(init=False, default_factory=dict)
    services: dict[str, Service] = field(init=False, default_factory=dict)
    admin_token: str = field(init=False, default="")
    fixture_url: str = field(init=False, default="")
    session_service: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.data = self.base / "data"
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.data / "logs").mkdir(exist_ok=True)
        if self.database == "postgres":
            self.pg_db = f"orz_soak_{int(time.time())}_{secrets.token_hex(3)}"
            self.db_url = "postgresql+asyncpg://" + _with_db(PG_SERVER, self.pg_db).split("://", 1)[1]
        else:
            self.db_url = f"sqlite+aiosqlite:///{self.data / 'orz.db'}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}"

    def metrics_url(self, service: str) -> str:
        """Where a service's metrics are (`orz server` shows all of them on the API's metrics port)."""
        port = self.ports["api_metrics"] if self.topology == "server" else self.ports[service + "_metrics"]
        return f"http://127.0.0.1:{port}/metrics"

    def service(self, name: str) -> Service:
        """The process running ``name`` (api, gateway, scheduler): in the server topology, the server."""
        return self.services["server" if self.topology == "server" else name]

    @property
    def fault_kinds(self) -> tuple[str, ...]:
        from soak_faults import FAULTS, SERVER_FAULTS

        return SERVER_FAULTS if self.topology == "server" else FAULTS

    # -- faults, as a supervisor on this machine sees them -----------------------------------------

    def restart(self, name: str) -> str:
        """kill -9 of the service's process and start it again (a supervisor's restart)."""
        service = self.service(name)
        pid = service.pid
        service.kill9()
        service.start(timeout=120)
        return f"pid {pid} killed -9, started again"

    def kill_session(self, sid: str) -> str:
        """kill -9 of the session's runner (its process group)."""
        state = json.loads((self.data / "sessions" / sid / "provider.json").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(state["pid"]), signal.SIGKILL)
        return f"runner pid {state['pid']} of {sid}"

    def terminate_db(self) -> str:
        """pg_terminate_backend of the API's connections."""
        if not self.pg_db:
            raise RuntimeError("only on PostgreSQL (--database postgres)")
        pid = self.service("api").pid
        ended = terminate_backends(self.pg_db, pid or 0)
        return f"{ended} connection(s) of the API (pid {pid}) terminated"

    def scheduler_leader(self) -> bool:
        return b"orz_scheduler_leader 1.0" in http_get(self.metrics_url("scheduler"))[1]

    def leftovers(self) -> list[str]:
        """What is left of sessions once all were killed: processes, tmux servers, session directories."""
        sessions = self.data / "sessions"
        left = [f"process {pid}: {cmd}" for pid, cmd in processes_mentioning(str(sessions))]
        # Dot-names are the provider's own bookkeeping (the uid claims' mark of this sessions directory), never a
        # session's (session ids start with a letter or digit).
        return left + ([f"session dir {d.name}" for d in sessions.iterdir() if not d.name.startswith(".")]
                       if sessions.is_dir() else [])

    def orz(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=env or self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, check=False)

    # -- set up -----------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.pg_db:
            _psql(f'CREATE DATABASE "{self.pg_db}"')
        for name in ("api", "api_metrics", "ssh", "web", "gateway_metrics", "scheduler_metrics"):
            self.ports[name] = free_port()
        home = self.base / "admin-home"
        home.mkdir(exist_ok=True)
        self.env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "LANG": "C.UTF-8",
            "PYTHONPATH": str(ROOT), "TERM": "xterm",
            "ORZ_DATA_DIR": str(self.data), "ORZ_DATABASE_URL": self.db_url, "ORZ_PROVIDER": "local",
            "ORZ_LOG_JSON": "true", "ORZ_API_PORT": str(self.ports["api"]),
            "ORZ_API_METRICS_PORT": str(self.ports["api_metrics"]),
            "ORZ_SSH_PORT": str(self.ports["ssh"]), "ORZ_GATEWAY_WEB_PORT": str(self.ports["web"]),
            "ORZ_GATEWAY_METRICS_PORT": str(self.ports["gateway_metrics"]),
            "ORZ_SCHEDULER_METRICS_PORT": str(self.ports["scheduler_metrics"]),
            "ORZ_PUBLIC_API_URL": f"http://127.0.0.1:{self.ports['api']}",
            # The soak's clock: sessions go idle, get reaped and are noticed within a short run.
            "ORZ_PLAN_IDLE_TIMEOUT_S": str(self.idle_timeout_s), "ORZ_REAP_INTERVAL_S": "3",
            "ORZ_HEARTBEAT_INTERVAL_S": "3", "ORZ_SCHEDULER_LEASE_S": "4", "ORZ_HEARTBEAT_FAIL_S": "60",
            "ORZ_WORK_SCAN_S": "5", "ORZ_QUOTA_TEAM": "500",
            "ORZ_REPO_FILE_DIRS": str(self.base), "ORZ_GATEWAY_DRAIN_S": "2",
        }
        self.fixture_url = make_fixture(self.base / "fixture")
        self._keys()
        migrated = self.orz("admin", "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(f"orz admin migrate: {migrated.stderr.strip()}")
        self.orz("admin", "create-org", "soak", "--plan", "team")
        self.orz("admin", "create-user", "admin@soak.test", "--org", "soak", "--role", "admin")
        self.admin_token = self._token("admin@soak.test")
        py = [sys.executable, "-m", "cli"]
        logs = self.data / "logs"
        if self.topology == "server":
            argv = [*py, "server", "--api-port", str(self.ports["api"]), "--ssh-port", str(self.ports["ssh"]),
                    "--web-port", str(self.ports["web"]), "--data-dir", str(self.data)]
            self.services = {"server": Service("server", argv, self.env, logs / "server.out",
                                               f"{self.web_url}/healthz")}
            self.services["server"].start()
            return
        self.services = {
            "api": Service("api", [*py, "api"], self.env, logs / "api.log", f"{self.api_url}/healthz"),
            "gateway": Service("gateway", [*py, "gateway"], self.env, logs / "gateway.log",
                               f"{self.web_url}/healthz"),
            "scheduler": Service("scheduler", [*py, "scheduler"], self.env, logs / "scheduler.log",
                                 self.metrics_url("scheduler")),
        }
        for service in self.services.values():
            service.start()

    def _keys(self) -> None:
        """The service token and gateway client key `orz server` would make for itself."""
        sys.path.insert(0, str(ROOT))
        from api.settings import load_settings
        from cli.server import embedded_settings

        settings = embedded_settings(load_settings(data_dir=self.data))
        self.env["ORZ_SERVICE_TOKEN"] = settings.service_token.get_secret_value()
        self.env["ORZ_GATEWAY_CLIENT_KEY_FILE"] = str(settings.gateway_client_key_file)
        self.env["ORZ_GATEWAY_PUBLIC_KEY"] = settings.gateway_public_key

    def _token(self, email: str) -> str:
        made = self.orz("admin", "create-token", email)
        match = re.search(r"orz_[A-Za-z0-9_\-]+", made.stdout)
        if not match:
            raise RuntimeError(f"orz admin create-token {email}: {made.stderr.strip() or made.stdout.strip()}")
        return match.group(0)

    def add_user(self, name: str) -> tuple[Path, str]:
        """A user of the soak org with their own HOME, CLI login and `ssh <id>.orz` config."""
        email = f"{name}@soak.test"
        self.orz("admin", "create-user", email, "--org", "soak")
        token = self._token(email)
        home = self.base / "homes" / name
        (home / ".config" / "orzbob").mkdir(parents=True, exist_ok=True)
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        token_file = home / ".config" / "orzbob" / "token.json"
        token_file.write_text(json.dumps({"api_url": self.api_url, "api_token": token}))
        token_file.chmod(0o600)
        env = self.user_env(home)
        wrote = self.orz("cloud", "ssh-config", "--write", env=env)
        if wrote.returncode != 0:
            raise RuntimeError(f"orz cloud ssh-config --write: {wrote.stderr.strip()}")
        return home, token

    def user_env(self, home: Path) -> dict[str, str]:
        return {"PATH": self.env["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT), "TERM": "xterm", "ORZBOB_API_URL": self.api_url}

    # -- tear down --------------------------------------------------------------------------------

    def stop(self) -> None:
        for name in ("gateway", "scheduler", "api", "server"):
            if name in self.services:
                self.services[name].stop()

    def drop_database(self) -> None:
        if self.pg_db:
            _psql(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')

    def db_rows(self) -> dict[str, int]:
        """Sessions (instances) by state straight from the database."""
        query = "SELECT state, count(*) FROM instances GROUP BY state"
        if self.pg_db:
            out = _psql(query, db=self.pg_db, tuples=True)
        else:
            out = subprocess.run(["python3", "-c", "import sqlite3,sys;c=sqlite3.connect(sys.argv[1]);"
                                  "print('\\n'.join(f'{s}|{n}' for s,n in c.execute(sys.argv[2])))",
                                  str(self.data / "orz.db"), query],
                                 capture_output=True, text=True, check=False).stdout
        rows: dict[str, int] = {}
        for line in out.splitlines():
            if "|" in line:
                state, _, count = line.partition("|")
                rows[state.strip()] = int(count.strip())
        return rows


def _with_db(url: str, db: str) -> str:
    """The server URL with another database name."""
    head, _, _ = url.rpartition("/")
    return f"{head}/{db}"


def _psql(sql: str, db: str | None = None, tuples: bool = False) -> str:
    target = _with_db(PG_SERVER, db) if db else PG_SERVER
    argv = ["psql", "-d", target, "-v", "ON_ERROR_STOP=1", "-c", sql]
    if tuples:
        argv[1:1] = ["-At"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"psql: {done.stderr.strip()}")
    return done.stdout


def terminate_backends(db: str, pid: int) -> int:
    """pg_terminate_backend of the connections process ``pid`` holds to ``db``; how many were ended."""
    ports = _client_ports(pid, 5432)
    if not ports:
        return 0
    listed = ",".join(str(p) for p in sorted(ports))  # integers; db is the soak's own generated name
    out = _psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{db}' "  # noqa: S608  # nosec B608
                f"AND client_port IN ({listed})", tuples=True)
    return int(out.strip() or 0)


def _client_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of the TCP connections process ``pid`` has to ``remote_port``."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


CLOUD_YAML = """\
version: "1.0"
setup:
  init: echo "init ran $(date +%s)" > .soak-init
  onAttach: echo attached >> .soak-onattach
env:
  SOAK_SECRET: ${SOAK_TOKEN}
services:
  cache:
    image: redis:7
    ports: [6379]
"""


def make_fixture(where: Path) -> str:
    """A bare git repository whose .orz/cloud.yaml has init, onAttach, a service and a secret."""
    work = where / "work"
    (work / ".orz").mkdir(parents=True, exist_ok=True)
    (work / ".orz" / "cloud.yaml").write_text(CLOUD_YAML)
    (work / "README.md").write_text("soak fixture\n")
    git = ["git", "-c", "user.name=soak", "-c", "user.email=soak@soak.test", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "fixture"], check=True)
    bare = where / "fixture.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    bare.chmod(0o755)
    for parent in (where, where.parent):
        parent.chmod(0o755)  # the sandboxed session (its own uid) reads the repository
    return f"file://{bare}"


# -- what processes look like ---------------------------------------------------------------------

def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line or environment names ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].startswith("Z"):
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline.strip()[:200]))
    return found
