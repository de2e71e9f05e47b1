"""The local provider (embedded default): each session's runner is a child process with its own directory.

Layout per session: ``{sessions_dir}/{id}/`` holding ``workspace/`` (kept across stop/start),
``state/`` (tmux socket, init log, sidecar data) and ``runner.log``. The runner gets its spec, token
and secrets through its environment only: nothing secret is put on a command line or written to disk.
Everything needed to find the process again (pid + kernel start time, so a reused pid is not mistaken
for ours) is in the provider state, so a restarted API adopts running runners or sees them gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
from pathlib import Path

from api.instances import repo_policy
from api.instances.providers import sandbox, sandbox_launch, session_disk
from api.instances.providers.base import (
    OPERATOR_RECORD,
    ComputeSpec,
    ComputeStatus,
    Provider,
    ProviderFailure,
    ProviderState,
)
from api.instances.providers.sandbox import process_start_time  # re-exported: the provider's tests use it
from api.schemas import (
    INIT_LOG_EARLIER_TITLE,
    INIT_LOG_START,
    SESSION_ID_RE,
    STATE_FATAL_FILE,
    STATE_INIT_LOG,
    STATE_RELEASED_FILE,
    UNIX_ROUTE_PREFIX,
)
from api.settings import Settings, quantity_bytes

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0
PID_FILE = "provider.json"
RUNNER_LOG = "runner.log"
PREVIOUS_RUNNER_LOG = "runner.previous.log"  # the run before this one's, kept for an operator, not shown
INIT_LOG = f"state/{STATE_INIT_LOG}"
FATAL_FILE = f"state/{STATE_FATAL_FILE}"
# The runner writes this once its sidecars, tmux server and endpoint are gone; it then only sends
# its last heartbeat. After a fatal error the API stops the runner while handling that very
# heartbeat, so waiting for the exit would deadlock: there stop() takes this as "compute released".
RELEASED_FILE = f"state/{STATE_RELEASED_FILE}"
# The environment variable naming one spawn of a runner (see _spawn).
SPAWN_ENV = "ORZ_RUNNER_SPAWN_ID"
_INHERIT = ("PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME")


class LocalProvider(Provider):
    name = "local"
    # stop() kills a runner that is still there STOP_GRACE_S after its SIGTERM.
    runner_stop_grace_s = STOP_GRACE_S

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.sessions_dir
        # Runners we spawned and have not yet reaped (adopted ones are not our children).
        self._children: set[int] = set()
        # Runners stop() signalled: close() gives them a moment to finish their last heartbeat.
        self._stopping: set[int] = set()
        # Kills due for runners that released their session by its files but had not exited (see stop).
        self._kills: dict[asyncio.Task[None], ProviderState] = {}
        # Exit codes of reaped runners, by pid (for logs and tests).
        self.exit_codes: dict[int, int] = {}
        # Each session's own filesystem (ORZ_SANDBOX_DISK_SIZE), its images kept outside the sessions' dirs.
        self.disk_size = quantity_bytes(settings.sandbox_disk_size) if self.sandboxed else None
        self.disks_dir = settings.data_dir / "session-disks"
        self.cgroup_parent_limits = sandbox.cgroup_parent_limits(settings) if self.sandboxed else {}
        self.uid_claims = sandbox.UidClaims(settings.sandbox_uid_claims_dir, settings.sandbox_uid_base,
                                            settings.sandbox_uid_count)
        if self.sandboxed:
            try:
                sandbox.find_tools()
            except sandbox.SandboxUnavailable as exc:
                log.error("%s", exc.reason)  # said at start; every create fails with the same reason
            if self.disk_size and not sandbox.runs_as_root():
                log.error("ORZ_SANDBOX_DISK_SIZE needs the server to run as root (it mounts each session's "
                          "disk); every create fails until it does")
            elif self.disk_size:
                session_disk.mount_all(self.root, self.disks_dir)  # after a reboot: their files are there again
            if sandbox.runs_as_root():
                self._adopt_uids()
                self._make_cgroup_parent()
        else:
            log.warning("ORZ_SANDBOX=off: sessions run unsandboxed as the server's own user and can read its "
                        "data dir, keys and each other's workspaces; for one developer only (sessions are "
                        "refused while more than one org exists)")

    def _make_cgroup_parent(self) -> None:
        """The cgroups (one per controller, in the server's own) every session's are made in: their limits
        hold for all sessions together, so that sessions forking or allocating without end leave the server,
        PostgreSQL and the host what they need (the server stays outside). Left in place for the sessions a
        restarted server adopts; close() removes it when it is empty."""
        limits = self.cgroup_parent_limits
        made = {group.relative_to(sandbox_launch.CGROUP_ROOT).parts[0]
                for group in sandbox_launch.make_cgroups(self.settings.sandbox_cgroup_parent, limits)}
        for key, value in limits.items():
            if key.split(".")[0] not in made:
                log.error("sandbox: the sessions' total %s (%s) cannot be set: it is not enforced", key, value)
        log.info("sandbox: all sessions together may have %s", ", ".join(f"{k}={v}" for k, v in limits.items()))
        if self.settings.sandbox_pids_max >= limits["pids.max"]:
            log.warning("ORZ_SANDBOX_PIDS_MAX (%s) is not below the sessions' total (%s): one session can take "
                        "every process the others may have", self.settings.sandbox_pids_max, limits["pids.max"])

    @property
    def sandboxed(self) -> bool:
        return self.settings.sandbox == "on"

    @property
    def isolates_sessions(self) -> bool:
        return self.sandboxed

    def runner_socket(self, session_id: str) -> str | None:
        """Sandboxed runners serve their endpoint on this unix socket only (the sandbox has its own network)."""
        return str(sandbox.SessionPaths(self.session_dir(session_id)).socket) if self.sandboxed else None

    def session_dir(self, session_id: str) -> Path:
        if not SESSION_ID_RE.match(session_id):
            raise ProviderFailure(f"invalid session id {session_id!r}")
        return self.root / session_id

    # -- lifecycle -------------------------------------------------------------------------------

    async def create(self, spec: ComputeSpec) -> ProviderState:
        base = self.session_dir(spec.session_id)
        if self.sandboxed:
            sandbox.find_tools()  # refuse before anything is made
        if self._alive(self._saved_state(base)):
            raise ProviderFailure(f"session {spec.session_id} already has a running runner")
        self._mount_disk(spec.session_id, base)
        (base / "workspace").mkdir(parents=True, exist_ok=True)
        (base / "state").mkdir(parents=True, exist_ok=True)
        return self._spawn(spec, base, await self._claim_uid(base))

    async def start(self, spec: ComputeSpec, state: ProviderState) -> ProviderState:
        base = self.session_dir(spec.session_id)
        if self._alive(state):
            return state
        saved = self._saved_state(base)
        if self._alive(saved):  # a runner the database does not know of yet (see _spawn): never a second one
            return saved
        self._mount_disk(spec.session_id, base)
        if not (base / "workspace").is_dir():
            raise ProviderFailure(f"session {spec.session_id} has no workspace to start from")
        return self._spawn(spec, base, await self._claim_uid(base))

    async def stop(self, session_id: str, state: ProviderState) -> ProviderState:
        base = self.session_dir(session_id)
        state = state or self._saved_state(base)
        pid = state.get("pid")
        if pid and self._alive(state):
            # The runner (or, sandboxed, its launcher, which passes it on) is a process-group leader:
            # its sidecars and helpers get the signal too.
            _killpg(int(pid), signal.SIGTERM)
            if int(pid) in self._children:
                self._stopping.add(int(pid))
            if not await self._wait_released(base, state, STOP_GRACE_S):
                log.warning("runner of %s ignored SIGTERM, killing it", session_id)
                await self._kill(session_id, state)
            elif self._alive(state):
                # Released by its files, not gone: after a fatal error the runner is still sending the last
                # heartbeat this stop may be handling. Those files are the session's own to write, so a
                # runner that is not gone by the end of its grace is killed as if it had ignored SIGTERM.
                task = asyncio.create_task(self._kill_unless_gone(session_id, state, STOP_GRACE_S))
                self._kills[task] = state
                task.add_done_callback(lambda done: self._kills.pop(done, None))
        if not self.sandboxed:
            # Sandboxed, the tmux server dies with the session's pid namespace; and a tmux client run here
            # (as root) would connect to whatever the session put at that path and send it our environment.
            await self._kill_tmux(base)
        self._reap()
        return {**state, "pid": None, "start_time": None}

    async def delete(self, session_id: str, state: ProviderState) -> None:
        base = self.session_dir(session_id)
        state = state or self._saved_state(base)
        await self.stop(session_id, state)
        await self._wait_exit(state)
        if self.sandboxed:
            await asyncio.to_thread(self._remove_cgroups, session_id)
        if self.disk_size or session_disk.image_path(self.disks_dir, session_id).exists():
            try:
                await asyncio.to_thread(session_disk.release, base,
                                        session_disk.image_path(self.disks_dir, session_id))
            except session_disk.SessionDiskFailure as exc:
                log.error("session %s: %s", session_id, exc.reason)
        await asyncio.to_thread(shutil.rmtree, base, True)
        if self.sandboxed and sandbox.runs_as_root():
            uid = state.get("uid")
            await asyncio.to_thread(self.uid_claims.release, base, uid if isinstance(uid, int) else None)

    async def close(self) -> None:
        """Let runners we stopped finish; running ones are left running (a restarted API adopts them)."""
        for task, state in list(self._kills.items()):
            task.cancel()
            await self._wait_exit(state)
        for pid in list(self._stopping):
            await self._wait_exit({"pid": pid, "start_time": None})
        self._reap()
        if self.sandboxed and sandbox.runs_as_root():  # the sessions' parent, when none is left in it
            await asyncio.to_thread(sandbox_launch.remove_cgroups, self.settings.sandbox_cgroup_parent)

    def _remove_cgroups(self, session_id: str) -> None:
        """A session's cgroups its killed launcher left (and, from before they had a parent, its old ones)."""
        sandbox_launch.remove_cgroups(f"{self.settings.sandbox_cgroup_parent}/{_cgroup_name(session_id)}")
        sandbox_launch.remove_cgroups(_cgroup_name(session_id))

    async def status(self, session_id: str, state: ProviderState) -> ComputeStatus:
        self._reap()
        base = self.session_dir(session_id)
        if self._alive(state or self._saved_state(base)):
            return ComputeStatus("running")
        fatal = _read_session_file(base / FATAL_FILE, 4096)
        if fatal is not None:
            return ComputeStatus("failed", fatal.decode("utf-8", "replace").strip())
        if base.is_dir():
            return ComputeStatus("stopped")
        return ComputeStatus("absent")

    async def list(self) -> dict[str, ComputeStatus]:
        if not self.root.is_dir():
            return {}
        out: dict[str, ComputeStatus] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and SESSION_ID_RE.match(entry.name):
                out[entry.name] = await self.status(entry.name, self._saved_state(entry))
        return out

    async def read_log(self, session_id: str, state: ProviderState, limit: int = 65536) -> str:
        base = self.session_dir(session_id)
        parts = []
        init_log = ""
        for title, rel in (("init log", INIT_LOG), ("runner log", RUNNER_LOG)):
            text = _tail(base / rel, limit)
            if rel == INIT_LOG:
                init_log = text
                # Only start lines (no start ran setup.init or printed anything): no init log to show.
                earlier, text = split_init_log(text) if _said_something(text) else ("", "")
                if earlier:
                    parts.append(f"{INIT_LOG_EARLIER_TITLE}\n{earlier}")
            else:
                text = runner_log_for_users(text, init_log)
            if text:
                parts.append(f"== {title} ==\n{text}")
        return "\n".join(parts)[-limit:]

    # -- helpers ---------------------------------------------------------------------------------

    def _mount_disk(self, session_id: str, base: Path) -> None:
        """The session's own filesystem at ``base`` (ORZ_SANDBOX_DISK_SIZE), made on its first start."""
        if not self.disk_size:
            return
        if not sandbox.runs_as_root():
            raise ProviderFailure("ORZ_SANDBOX_DISK_SIZE needs the server to run as root (it mounts each "
                                  "session's disk); unset it or run the server as root")
        image = session_disk.image_path(self.disks_dir, session_id)
        if not session_disk.ensure(base, image, self.disk_size):
            log.warning("session %s was made before ORZ_SANDBOX_DISK_SIZE: it keeps the data dir's filesystem",
                        session_id)

    def _spawn(self, spec: ComputeSpec, base: Path, uid: int | None) -> ProviderState:
        tools = sandbox.find_tools() if self.sandboxed else None  # before anything is made or started
        socket = self.runner_socket(spec.session_id)
        runner_spec = spec.runner_spec(
            ssh_host=UNIX_ROUTE_PREFIX + socket if socket else "127.0.0.1", ssh_port=0,
            workspace=str(base / "workspace"), state_dir=str(base / "state"),
            network_ready_file=str(sandbox.SessionPaths(base).network_ready) if socket else None,
            # Its connections to the API through the relay come from here: the relay keeps some for them.
            api_source_address=(sandbox_launch.RUNNER_SOURCE
                                if socket and sandbox.loopback_port(spec.api_url) is not None else None),
        )
        env = {k: os.environ[k] for k in _INHERIT if k in os.environ}
        env.setdefault("LANG", "C.UTF-8")
        # Secrets first, so a secret can never override how the runner itself is told what to do.
        env = {**dict(spec.secret_env), **env}
        env.update({
            "ORZ_RUNNER_SPEC": runner_spec.model_dump_json(),
            "ORZ_RUNNER_TOKEN": spec.runner_token,
            "ORZ_LOG_LEVEL": self.settings.log_level,
            "ORZ_RUNNER_FAST_PATH": str(self.settings.runner_fast_path).lower(),
            "PYTHONPATH": _runner_import_root(),
            "PYTHONUNBUFFERED": "1",
        })
        (base / FATAL_FILE).unlink(missing_ok=True)
        (base / RELEASED_FILE).unlink(missing_ok=True)
        # Each run its own runner log: `orz cloud logs` showed an earlier run's fatal error after a later
        # start succeeded, as if it were the session's state now.
        with contextlib.suppress(FileNotFoundError):
            (base / RUNNER_LOG).replace(base / PREVIOUS_RUNNER_LOG)
        # Recorded before the spawn and carried in the runner's environment: an API killed between the
        # spawn and recording the pid leaves a runner that _saved_state still finds (else the reconciler
        # would see "stopped", start a second runner on the same workspace and orphan the first).
        spawn_id = secrets.token_hex(12)
        env[SPAWN_ENV] = spawn_id
        # The session's uid stays in the record: a start that fails from here on must not lose it.
        kept = {"uid": uid} if uid is not None else {}
        (base / PID_FILE).write_text(json.dumps({"pid": None, "spawn": spawn_id, "dir": str(base), **kept}),
                                     encoding="utf-8")
        argv = [sys.executable, "-P", "-m", "runner"]
        extra: ProviderState = {}
        if tools is not None:
            argv, extra, env = self._sandboxed(spec, base, tools, argv, env, uid)
        # posix_spawn rather than Popen: a runner outlives this API process by design, and a Popen
        # object dropped while its child runs warns; we reap our children ourselves (see _reap).
        # Python's own fds are close-on-exec, so the runner inherits only stdin/stdout/stderr.
        # -P: the API's working directory must not shadow the runner package on sys.path.
        pid = os.posix_spawn(argv[0], argv, env, setsid=True,
                             file_actions=[
                                 (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                 (os.POSIX_SPAWN_OPEN, 1, str(base / RUNNER_LOG),
                                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                                 (os.POSIX_SPAWN_DUP2, 1, 2),
                             ])
        self._children.add(pid)
        started = process_start_time(pid)
        state: ProviderState = {"pid": pid, "start_time": started, "dir": str(base), "spawn": spawn_id, **extra}
        (base / PID_FILE).write_text(json.dumps(state), encoding="utf-8")
        log.info("started runner for %s (pid %s)", spec.session_id, pid)
        return state

    def _sandboxed(self, spec: ComputeSpec, base: Path, tools: sandbox.Tools, argv: list[str],
                   env: dict[str, str], claimed: int | None) -> tuple[list[str], ProviderState, dict[str, str]]:
        """The launcher's argv, the state to keep (the session's uid) and the runner's environment."""
        paths = sandbox.SessionPaths(base)
        if sandbox.runs_as_root():
            if claimed is None:
                raise ProviderFailure(f"session {spec.session_id} has no sandbox uid claimed")
            uid = gid = claimed
        else:
            uid, gid = os.getuid(), os.getgid()
        paths.home.mkdir(exist_ok=True)
        sandbox.write_home_note(paths.home)  # what the sandbox refuses, for whoever wonders why
        paths.etc.mkdir(mode=0o700, exist_ok=True)
        if self.disk_size:  # /tmp on the session's own disk, as empty as a fresh tmpfs at each start
            shutil.rmtree(paths.tmp, ignore_errors=True)
            paths.tmp.mkdir()
            paths.tmp.chmod(0o1777)
        repo = self._file_repo(spec.repo_url)
        for name, text in sandbox.etc_files(uid, gid, paths.home, [repo] if repo else []).items():
            (paths.etc / name).write_text(text, encoding="utf-8")
            (paths.etc / name).chmod(0o644)
        base.chmod(0o700)  # only the server (and the gateway) reach the session's files from outside
        if sandbox.runs_as_root():
            for top in paths.writable():
                _chown_tree(top, uid, gid)
        runner_env = {k: v for k, v in env.items() if k not in ("HOME", "USER", "LOGNAME")}
        runner_env.update(HOME=str(paths.home), USER="orz", LOGNAME="orz")
        relay = set(self.settings.sandbox_host_ports())
        api_port = sandbox.loopback_port(spec.api_url)
        if api_port is not None:
            relay.add(api_port)  # heartbeats: the one host service every runner must reach
        root = sandbox.runs_as_root()
        bwrap = sandbox.bwrap_argv(
            tools, paths, session_id=spec.session_id, uid=uid, gid=gid, as_root=root,
            extra_ro=sandbox.python_roots(_runner_import_root()) + ([repo] if repo else []),
            hidden=[self.settings.data_dir], tmp_on_disk=bool(self.disk_size))
        plan = sandbox.launcher_plan(
            bwrap=bwrap, command=sandbox.command_prefix(uid, gid, root) + argv, tools=tools,
            relay_ports=relay, cgroup_name=_cgroup_name(spec.session_id) if root else None,
            limits=sandbox.cgroup_limits(self.settings, spec.resources), paths=paths, session_id=spec.session_id,
            cgroup_parent=self.settings.sandbox_cgroup_parent, cgroup_parent_limits=self.cgroup_parent_limits,
            egress_allow=self.settings.sandbox_egress_allowed(),
            relay_max_connections=self.settings.sandbox_relay_max_connections, api_port=api_port)
        # -I -S: the launcher needs only the standard library; skipping site-packages saves ~0.1 s a start.
        launcher = [sys.executable, "-I", "-S", sandbox_launch.__file__, json.dumps(plan)]
        return launcher, {"uid": uid}, runner_env

    async def _claim_uid(self, base: Path) -> int | None:
        """The sandbox uid of the session's next run (root and sandboxed only), claimed host-wide: other
        servers' sessions hold uids too. Its own uid again when nobody else took it, else another (and the
        session's files are handed to it in _sandboxed). Read before _spawn rewrites the record; claimed in
        a thread, as it may wait for another server's lock, which must not stall the API."""
        if not (self.sandboxed and sandbox.runs_as_root()):
            return None
        wanted = self._saved_state(base).get("uid")
        wanted = wanted if isinstance(wanted, int) else None
        return await asyncio.to_thread(lambda: self.uid_claims.claim(base, wanted, self._taken_uids(base)))

    def _adopt_uids(self) -> None:
        """Claim again the uids of this data dir's sessions (a restart, a moved data dir, sessions from
        before the claims), before another server could take them over."""
        if not self.root.is_dir():
            return
        sessions = {}
        for entry in self.root.iterdir():
            uid = self._saved_state(entry).get("uid") if entry.is_dir() and SESSION_ID_RE.match(entry.name) else None
            if isinstance(uid, int):
                sessions[entry] = uid
        if not sessions:
            return
        try:
            refused = self.uid_claims.adopt(sessions)
        except (ProviderFailure, OSError) as exc:
            log.error("cannot claim the sessions' sandbox uids again: %s", getattr(exc, "reason", exc))
            return
        for entry in refused:
            running = self._alive(self._saved_state(entry))
            log.error("session %s: its sandbox uid %s is another server's session's now; it gets a free uid at "
                      "its next start%s", entry.name, sessions[entry],
                      " (its runner still runs with the old one: stop it)" if running else "")

    def _file_repo(self, repo_url: str | None) -> Path | None:
        """An allowed file:// repository's directory (shown read-only in the sandbox); None otherwise."""
        path = repo_policy.file_repo_path(repo_url or "")
        if path is None or not path.is_dir():
            return None
        try:
            repo_policy.check_file_url(path, self.settings)
        except repo_policy.RepoUrlRefused:
            return None  # the API refuses these; a row from before the rule just fails to clone
        return path

    def _taken_uids(self, own: Path) -> set[int]:
        taken = set()
        for entry in self.root.iterdir():
            if entry != own and entry.is_dir():
                uid = self._saved_state(entry).get("uid")
                if isinstance(uid, int):
                    taken.add(uid)
        return taken

    def _saved_state(self, base: Path) -> ProviderState:
        try:
            data = json.loads((base / PID_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        if data.get("spawn") and not data.get("pid"):
            found = _find_spawned(str(data["spawn"]))
            if found is not None:  # spawned by an API that died before it wrote the pid down: adopt it
                data = {**data, "pid": found, "start_time": process_start_time(found)}
                log.warning("adopted runner pid %s of %s, whose pid was never recorded", found, base.name)
                (base / PID_FILE).write_text(json.dumps(data), encoding="utf-8")
        return data

    def _alive(self, state: ProviderState) -> bool:
        pid, started = state.get("pid"), state.get("start_time")
        if not pid:
            return False
        self._reap()
        now = process_start_time(int(pid))
        return now is not None and (started is None or now == started)

    async def _wait_released(self, base: Path, state: ProviderState, seconds: float) -> bool:
        """Wait until the runner has exited, or (after a fatal error) released everything."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._alive(state) and not all(_is_session_file(base / rel) for rel in (FATAL_FILE, RELEASED_FILE)):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _kill(self, session_id: str, state: ProviderState) -> None:
        """SIGKILL the runner's process group (sandboxed: the launcher, and with it the whole namespace)."""
        _killpg(int(state["pid"]), signal.SIGKILL)
        await self._wait_gone(state, 5.0)
        if self.sandboxed:  # the killed launcher could not remove them itself
            await asyncio.to_thread(self._remove_cgroups, session_id)

    async def _kill_unless_gone(self, session_id: str, state: ProviderState, seconds: float) -> None:
        if not await self._wait_gone(state, seconds):
            log.warning("runner of %s still running %.0f s after it released the session, killing it",
                        session_id, seconds)
            await self._kill(session_id, state)

    async def _wait_exit(self, state: ProviderState) -> None:
        """Give a released runner a moment to send its last heartbeat and exit; then kill it."""
        if state.get("pid") and not await self._wait_gone(state, 5.0):
            _killpg(int(state["pid"]), signal.SIGKILL)
            await self._wait_gone(state, 2.0)

    async def _wait_gone(self, state: ProviderState, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self._alive(state):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _reap(self) -> None:
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                done, status = pid, 0
            if done:
                self.exit_codes[pid] = os.waitstatus_to_exitcode(status)
                log.info("runner pid %s exited with %s", pid, self.exit_codes[pid])
                self._children.discard(pid)
                self._stopping.discard(pid)

    async def _kill_tmux(self, base: Path) -> None:
        # Fallback for a runner that died without cleaning up: its tmux server is not in its group.
        socket = base / "state" / "tmux.sock"
        if socket.exists() and shutil.which("tmux"):
            proc = await asyncio.create_subprocess_exec(
                "tmux", "-S", str(socket), "kill-server", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            await proc.wait()


def _find_spawned(spawn_id: str) -> int | None:
    """The process group leader started with ``SPAWN_ENV=spawn_id`` in its environment, if it runs."""
    needle = f"{SPAWN_ENV}={spawn_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid and process_start_time(pid) is not None:
                return pid
    return None


def _killpg(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _cgroup_name(session_id: str) -> str:
    return f"orz-{session_id}"


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    """Hand a session's directory to its uid (new ones are empty; a workspace from before the sandbox is not)."""
    if top.lstat().st_uid == uid:
        return
    os.chown(top, uid, gid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _runner_import_root() -> str:
    """Where ``python -m runner`` finds the runner package (found without importing it)."""
    spec = importlib.util.find_spec("runner")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderFailure("the runner package is not installed next to the API")
    return str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)


# The runner's routine lines ("2026-12-05 10:01:02,345 INFO httpx: HTTP Request: ..."); what is left
# (warnings, errors, tracebacks, a tool's own failure) is what a user reading `orz cloud logs` needs. The
# whole file stays in the session directory.
_ROUTINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO) ")
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
_WARNING = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ WARNING [\w.]+: (.*)$")
_INIT_WARNING = "[orz] warning: "  # how runner.main's _warn writes a warning into the init log
# The sandbox's network helper (slirp4netns) on its stderr: handing over the tap device, and exiting with
# the session. Single lines, dropped on their own: what follows them is not theirs.
_NETWORK_HELPER = re.compile(r"^((sent|received) tapfd=\d+.*|exitfd event|do_slirp is exiting)$")


def split_init_log(text: str) -> tuple[str, str]:
    """(earlier starts, this start) of an init log: this start's part begins at the last start line the
    runner wrote (INIT_LOG_START); a log without one is all this start's."""
    at = text.rfind("\n" + INIT_LOG_START)
    if at < 0:
        return "", text
    return text[:at + 1], text[at + 1:]


def _said_something(part: str) -> bool:
    """Whether an init log holds more than the runner's start lines: starts that ran no setup.init and
    printed nothing are not news (`orz cloud logs` then says there is no init log)."""
    return any(not line.startswith(INIT_LOG_START) for line in part.splitlines() if line.strip())


def runner_log_for_users(text: str, init_log: str = "") -> str:
    """The runner log without its routine lines (a routine record's continuation lines go with it), nor the
    warnings the init log above it already shows (the runner writes `.orz/cloud.yaml`'s to both), nor the
    records only operators read (base.without_operator_records)."""
    said = {line.removeprefix(_INIT_WARNING) for line in init_log.splitlines() if line.startswith(_INIT_WARNING)}
    kept, routine = [], False
    for line in text.splitlines(keepends=True):
        if _NETWORK_HELPER.match(line.rstrip("\r\n")):
            continue
        if _RECORD.match(line):
            warning = _WARNING.match(line.rstrip("\r\n"))
            routine = (bool(_ROUTINE.match(line)) or bool(warning and warning.group(1) in said)
                       or bool(OPERATOR_RECORD.match(line)))
        if not routine:
            kept.append(line)
    return "".join(kept)


def _open_session_file(path: Path) -> int | None:
    """An fd of ``path`` if it is a regular file itself, else None.

    The files under ``state/`` belong to the session's uid, which may make any of them a symlink (to a key,
    the database), a FIFO (a read that never returns) or a device; this process is the server's user, root
    in the sandboxed default, so it must read what the session wrote there and nothing it points at. Only
    the last component is the session's: the session directory above it is the server's (0700).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _is_session_file(path: Path) -> bool:
    fd = _open_session_file(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def _read_session_file(path: Path, limit: int) -> bytes | None:
    """The last ``limit`` bytes of a regular file the session wrote; None when it is absent or not one."""
    fd = _open_session_file(path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - limit))
        return fh.read(limit)


def _tail(path: Path, limit: int) -> str:
    data = _read_session_file(path, limit * 4)
    return data.decode("utf-8", "replace")[-limit:] if data else ""
