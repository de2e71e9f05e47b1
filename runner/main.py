"""The runner's start sequence: clone, validate, endpoint, sidecars, init, tmux; then heartbeat until told
to stop. ``orz runner`` and ``python -m runner`` call ``main()``.

Sidecars run where the spec says: ``local`` processes this runner starts, or ``pod`` containers beside
it. In pod mode a Pod built without the services .orz/cloud.yaml names gets them reported instead, and
the runner starts nothing (no endpoint, no init) until the API has replaced the Pod with one that has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from api.client import ApiClient
from api.schemas import (
    SESSION_ID_RE,
    STATE_FATAL_FILE,
    STATE_INIT_LOG,
    STATE_RELEASED_FILE,
    RunnerSpec,
    WorkState,
    describe_validation,
    services_digest,
)
from api.settings import load_settings
from runner import agent, cloud_config, program, work, workspace
from runner.activity import Activity, HeartbeatLoop
from runner.agent_watch import AgentWatch
from runner.cloud_config import CloudConfig
from runner.errors import InitError, RunnerError
from runner.recording import Recorder, Uploader
from runner.services import ServiceManager, pod_sidecars, wait_for_ports
from runner.sshd import Endpoint, SessionHooks
from runner.tmux import Tmux

log = logging.getLogger(__name__)
# The runner's log records ("2026-12-05 10:01:02,345 WARNING runner.main: ..."): the providers' read_log
# reads them by this shape (api/instances/providers/base.py, local.py).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Pod mode: a runner of this Pod got past the services check (the state dir lives as long as the Pod).
POD_STARTED_FILE = "pod-started"
# Variables of the runner's own environment a session inherits; ORZ_* (the runner token) never.
_INHERIT = ("PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME", "TMPDIR")
_MAX_UNIX_PATH = 100
EXIT_OK, EXIT_FATAL = 0, 2
NETWORK_READY_TIMEOUT_S = 15.0
# How often the runner looks at the program's pane when tmux's pane-died hook has not fired.
PROGRAM_CHECK_S = 5.0


def login_shell() -> str:
    """The user's login shell, else bash, else sh."""
    with contextlib.suppress(KeyError):
        shell = pwd.getpwuid(os.getuid()).pw_shell
        if shell and os.access(shell, os.X_OK) and not shell.endswith(("nologin", "false")):
            return shell
    return shutil.which("bash") or "/bin/sh"


class Runner:
    """One session's runner; ``run`` returns the process exit code."""

    def __init__(self, spec: RunnerSpec, token: str, environ: Mapping[str, str], *, fast_path: bool = True) -> None:
        self.spec = spec
        self.fast_path = fast_path  # settings.runner_fast_path (False: the endpoint's data all through asyncssh)
        self.token = token
        self.workspace = Path(spec.workspace).resolve()
        self.state_dir = Path(spec.state_dir).resolve()
        self.secrets = {name: environ[name] for name in spec.secret_env if name in environ}
        self.shell = login_shell()
        self.base_env = {k: v for k, v in environ.items() if k in _INHERIT or k.startswith("LC_")}
        self.base_env.setdefault("PATH", os.defpath)
        self.base_env["SHELL"] = self.shell
        self.base_env["ORZ_SESSION_ID"] = spec.session_id
        if spec.owner_email:  # the owner's git identity, the lowest-priority config (workspace.write_identity)
            self.base_env["GIT_CONFIG_SYSTEM"] = str(self.state_dir / workspace.IDENTITY_CONFIG)
        self.session_env: dict[str, str] = {**self.base_env, **self.secrets}
        self.config: CloudConfig | None = None
        self.activity = Activity()
        self.tmux = Tmux(self.state_dir / "tmux.sock",
                         kept_scrollback=Path(spec.scrollback_file) if spec.scrollback_file else None)
        self.recorder = (Recorder(self.tmux, self.state_dir, spec.recording_max_bytes)
                         if spec.recording_max_bytes else None)
        self.uploader: Uploader | None = None
        self.client: ApiClient | None = None
        self.ready = asyncio.Event()
        self.services = ServiceManager(self.state_dir, self.base_env)
        self.pod_ports: list[int] = []  # pod mode: the sidecars' ports init waits for
        self.endpoint: Endpoint | None = None
        self.program = program.program_argv(spec.program, spec.task, self.shell)
        # Whether the pane's current program was seen dead and reported (one event per exit).
        self._exit_reported = False
        self._exit_watch: asyncio.Task[None] | None = None
        self.agent_file = self.state_dir / agent.STATE_FILE
        self.watch = AgentWatch(
            tmux=self.tmux, activity=self.activity, state_file=self.agent_file,
            detector=agent.Detector(spec.needs_input_after_s,
                                    login_shell=program.runs_login_shell(spec.program, spec.task, self.shell)),
            workspace=self.workspace, env=self.base_env, work_scan_s=spec.work_scan_s)

    @property
    def init_log(self) -> Path:
        return self.state_dir / STATE_INIT_LOG

    async def run(self, stop: asyncio.Event) -> int:
        client = self.client = ApiClient(self.spec.api_url, self.token, local_address=self.spec.api_source_address)
        heartbeats = HeartbeatLoop(client, self.spec.session_id, self.activity,
                                   self.spec.heartbeat_interval_s, refresh=self._refresh)
        heartbeats.start()
        code = EXIT_OK
        try:
            starting = asyncio.create_task(self._start())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await stop.wait()
        except RunnerError as exc:
            code = EXIT_FATAL
            self._fatal(str(exc))
        except Exception as exc:
            # Anything else (an OSError, bad data such as "embedded null byte") must still end the
            # session with its reason, not leave it `starting` until heartbeats are missed.
            log.exception("runner failed")
            code = EXIT_FATAL
            self._fatal(f"the runner failed: {type(exc).__name__}: {exc}")
        finally:
            stopping.cancel()
            await self._shutdown()
            await heartbeats.stop()
            self.activity.program_running = False
            await self._last_word(heartbeats)
            # After the last word: a provider's stop that waits for this file finds the final work report
            # recorded, while this runner's token is still valid (a two-phase delete decides on it).
            with contextlib.suppress(OSError):
                (self.state_dir / STATE_RELEASED_FILE).write_text("ok\n", encoding="utf-8")
            await client.aclose()
        return code

    async def _last_word(self, heartbeats: HeartbeatLoop) -> None:
        """Send the final state (fatal error, program stopped, the workspace's final work), best effort,
        within a few seconds.

        Everything is released by now (STATE_RELEASED_FILE follows at once): the API may stop us while
        handling this very request (it does so in the background), and we keep the connection open for its
        reply rather than cut the request short by exiting on SIGTERM.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await heartbeats.flush()

    def _fatal(self, message: str) -> None:
        log.error("fatal: %s", message)
        self.activity.fatal_error = message
        self.activity.set_init_log(workspace.tail(self.init_log))
        with contextlib.suppress(OSError):
            (self.state_dir / STATE_FATAL_FILE).write_text(message + "\n", encoding="utf-8")

    async def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.workspace.mkdir(parents=True, exist_ok=True)
        (self.state_dir / STATE_FATAL_FILE).unlink(missing_ok=True)
        (self.state_dir / STATE_RELEASED_FILE).unlink(missing_ok=True)
        start = workspace.mark_start(self.init_log, datetime.now(UTC))
        log.info("start %d of session %s", start, self.spec.session_id)
        if len(str(self.tmux.socket)) > _MAX_UNIX_PATH:
            raise RunnerError(f"state dir path too long for a unix socket: {self.state_dir}")
        tmux_tmpdir = self.tmux.default_socket_dir()
        if tmux_tmpdir is not None:  # `tmux ls` / `tmux attach` in an ssh command find the session's server
            self.session_env["TMUX_TMPDIR"] = str(tmux_tmpdir)
        else:
            log.warning("state dir path too long for tmux's default socket: a plain `tmux ls` in the session "
                        "will not find its server")
        await workspace.write_identity(self.state_dir / workspace.IDENTITY_CONFIG, self.spec.owner_name,
                                       self.spec.owner_email, {"PATH": self.base_env["PATH"]})
        await workspace.trust(self.workspace, self.base_env)
        self.session_env.update(program.task_env(self.spec.task, self.state_dir))
        if self.spec.repo_url:
            token = self.secrets.get(workspace.GIT_TOKEN_ENV)
            if not await workspace.clone(self.spec.repo_url, self.spec.branch, self.workspace,
                                         env=self.base_env, token=token):
                done = await workspace.refresh(self.spec.repo_url, self.workspace, env=self.base_env, token=token,
                                               pull=self.spec.pull)
                workspace.note(self.init_log, done.notes)
        self.config = cloud_config.find(self.workspace, max_services=self.spec.max_services)
        if self.config is not None:
            self._warn(self.config.warnings)
            # Resolve every ${SECRET} before anything starts, so a bad ref fails fast and leaves nothing.
            self.session_env.update(cloud_config.resolve_env(self.config, self.secrets))
            for name in self.config.services:
                cloud_config.resolve_service_env(self.config, name, self.secrets)
        self._install_agent_helpers()
        if self.spec.sidecars == "pod" and not self._pod_runs_services():
            return  # the API replaces this Pod with one that runs them; nothing starts here meanwhile

        await self._start_endpoint()
        await self._start_services()
        await self._run_init()
        workspace.mark_setup_done(self.workspace)
        await self._start_recording()
        started = await self.tmux.ensure(self.program, cwd=self.workspace, env=self.session_env)
        if self.recorder is not None:
            await self.recorder.pane_ready(started is not None)
        # Attached terminals (ssh, the browser page) show the agent's state in their title.
        await self.tmux.run("set-option", "-g", "set-titles", "on", check=False)
        await self.tmux.run("set-option", "-g", "set-titles-string", agent.title_format(self.spec.session_id),
                            check=False)
        self.activity.program_running = True
        self._exit_watch = asyncio.create_task(self._watch_program_exits(), name="program-exits")
        self.ready.set()
        self.watch.start()
        self.activity.poke()
        log.info("session %s is ready", self.spec.session_id)

    async def _start_recording(self) -> None:
        """Record the pane from the program's first byte; a recording that cannot start is logged, not fatal."""
        if self.recorder is None:
            return
        try:
            await self.recorder.start(Tmux.WIDTH, Tmux.HEIGHT)
        except OSError as exc:
            log.warning("the session is not recorded: %s", exc)
            self.recorder = None
            return
        if self.client is not None:
            self.uploader = Uploader(self.client, self.spec.session_id, self.recorder.cast)
            self.uploader.start()

    def _install_agent_helpers(self) -> None:
        """``orz-session`` on the session's PATH, and Claude Code hooks that call it in the user's settings."""
        self.agent_file.unlink(missing_ok=True)  # a report of an earlier run says nothing about this one
        bindir = agent.install_helper(self.state_dir)
        self.session_env["PATH"] = f"{bindir}{os.pathsep}{self.session_env.get('PATH', os.defpath)}"
        home = self.session_env.get("HOME")
        if home:
            agent.install_claude_hooks(Path(home), bindir / agent.HELPER)

    async def _save_work(self) -> None:
        """Before the workspace may go away: commit what is uncommitted and push it to orz/<id> (bounded)."""
        token = self.secrets.get(workspace.GIT_TOKEN_ENV)
        env = workspace.git_env(self.base_env, self.spec.repo_url or "", token)
        saved = await work.save_bounded(self.workspace, self.spec.session_id, env)
        if saved is None and not (self.workspace / ".git").exists():
            saved = WorkState()  # no git checkout: nothing a delete could lose by git's account
        if saved is not None:
            # Marked final: the program is gone, so this is what a delete would lose. A save that failed
            # or timed out leaves the last scan unmarked, and a delete without force refuses on it.
            self.activity.work = saved.model_copy(update={"final": True})

    def _warn(self, warnings: list[str]) -> None:
        """Keys this version ignores: in the runner's log and the init log, where `orz cloud logs` shows them."""
        if not warnings:
            return
        self.init_log.parent.mkdir(parents=True, exist_ok=True)
        with self.init_log.open("a", encoding="utf-8") as out:
            for line in warnings:
                log.warning("%s", line)
                out.write(f"[orz] warning: {line}\n")
        self.activity.set_init_log(workspace.tail(self.init_log))

    def _pod_runs_services(self) -> bool:
        """Pod mode: whether to go on with the services this Pod runs; if they are not the file's, report."""
        wanted = pod_sidecars(self.config)
        started = self.state_dir / POD_STARTED_FILE
        if services_digest([s.model_dump(mode="json") for s in wanted]) == self.spec.pod_services_digest:
            self.pod_ports = [port for s in wanted for port in s.ports]
            started.touch()
            return True
        if started.exists():
            # The container restarted in a Pod that ran, and the file changed since: replacing the Pod now
            # would cut off whoever uses it, so the new services wait for the session's next start.
            log.warning("the services in %s changed; they apply when the session starts again",
                        cloud_config.CONFIG_PATH)
            return True
        self.activity.services = wanted
        self.activity.poke()
        log.info("this pod lacks the services in %s (%s): reported, waiting for the pod to be replaced",
                 cloud_config.CONFIG_PATH, ", ".join(s.name for s in wanted) or "none")
        return False

    async def _start_services(self) -> None:
        if self.spec.sidecars == "pod":
            # The Pod starts its containers together, and init often needs the database already up.
            closed = await wait_for_ports(self.pod_ports)
            if closed:
                log.warning("sidecar ports %s still closed; going on without them", closed)
        elif self.config is not None and self.config.services:
            await self.services.start_all(self.config, self.secrets)

    async def _start_endpoint(self) -> None:
        hooks = SessionHooks(
            workspace=self.workspace, shell=self.shell, tmux=self.tmux, activity=self.activity,  # nosec B604  # shell= is a path
            env=lambda: dict(self.session_env), ensure_program=self._ensure_program, ready=self.ready,
            on_attach=lambda: self.config.setup.onAttach if self.config else None,
            on_attach_timeout_s=cloud_config.ON_ATTACH_TIMEOUT_S, login=self.spec.session_id,
        )
        if not self.fast_path:
            log.info("the endpoint's fast path is off (ORZ_RUNNER_FAST_PATH=false): session data goes through asyncssh")
        self.endpoint = Endpoint(hooks, self.spec.gateway_public_key, self.spec.ssh_host, self.spec.ssh_port,
                                 fast_path=self.fast_path)
        port = await self.endpoint.start()
        self.activity.host_key = self.endpoint.host_public_key
        self.activity.ssh_host = self.spec.advertise_host or self.spec.ssh_host
        self.activity.ssh_port = port
        self.activity.poke()
        log.info("internal SSH endpoint on %s:%s", self.spec.ssh_host, port)

    async def _run_init(self) -> None:
        command = self.config.setup.init if self.config else None
        if not command:
            self.activity.init_status = "none"
            return
        if workspace.init_done(self.workspace):
            self.activity.init_status = "succeeded"
            return
        self.activity.init_status = "running"
        self.activity.poke()
        try:
            await workspace.run_init(command, self.workspace, self.init_log, env=self.session_env,
                                     shell=self.shell, timeout_s=cloud_config.INIT_TIMEOUT_S)  # nosec B604  # shell= is a path
        except InitError:
            self.activity.init_status = "failed"
            raise
        finally:
            self.activity.set_init_log(workspace.tail(self.init_log))
        self.activity.init_status = "succeeded"
        self.activity.poke()

    async def _ensure_program(self) -> None:
        started = await self.tmux.ensure(self.program, cwd=self.workspace, env=self.session_env)
        if started is not None:
            if self.recorder is not None:
                await self.recorder.pane_ready(started=True)
            self._exit_reported = False
            self.activity.program_running = True
            self.activity.program_exit_code = None
            self.activity.note_program("program_restarted", "the program was restarted for an attach")

    async def _watch_program_exits(self) -> None:
        """Send a heartbeat (which reads and reports the exit) as soon as tmux says the program exited.

        tmux's pane-died hook says so at once; as tmux 3.3 sometimes notices an exit only when another
        of its children exits (see Tmux.pane_state), the pane is also looked at every few seconds."""
        while True:
            try:
                async with asyncio.timeout(PROGRAM_CHECK_S):
                    died = await self.tmux.wait_pane_died()
                    if not died:
                        await asyncio.sleep(1.0)  # no server right now (recreated on the next attach)
            except TimeoutError:
                died = not self._exit_reported and (await self.tmux.pane_state()).dead
            if died:
                self.activity.poke()

    async def _refresh(self) -> None:
        """Read the pane's output time and the program's state just before each heartbeat."""
        if not self.ready.is_set():
            return
        pane = await self.tmux.pane_state()
        if pane.last_output_at and (self.activity.last_output_at is None
                                    or pane.last_output_at > self.activity.last_output_at):
            self.activity.last_output_at = pane.last_output_at
        self.activity.program_running = pane.exists and not pane.dead
        self.activity.program_exit_code = pane.exit_code
        if pane.dead and not self._exit_reported:
            self._exit_reported = True
            self.activity.note_program("program_exited", f"the program {program.describe_exit(pane.exit_code)}",
                                       exit_code=pane.exit_code)

    async def _shutdown(self) -> None:
        self.ready.set()  # release attaches still waiting for a start that will not come
        if self._exit_watch is not None:
            self._exit_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._exit_watch
        with contextlib.suppress(Exception):
            await self.watch.stop()
        if self.endpoint is not None:
            with contextlib.suppress(Exception):
                await self.endpoint.close()
            # The endpoint is closed: the last heartbeat must not advertise it as a route.
            self.activity.host_key = self.activity.ssh_host = self.activity.ssh_port = None
        with contextlib.suppress(Exception):
            await self.tmux.kill_server()
        if self.recorder is not None:
            with contextlib.suppress(Exception):
                await self.recorder.stop()  # after tmux: what the pane printed last is in the recording
        if self.uploader is not None:
            with contextlib.suppress(Exception):
                # Before the released file: the provider waits for it, and the runner token is valid till then.
                await self.uploader.close()
        try:
            # After the program is gone (a consistent snapshot) and before the sidecars' own stop time,
            # so the push fits in the provider's grace period.
            await self._save_work()
        except Exception:
            log.exception("could not save the session's work")
        with contextlib.suppress(Exception):
            await self.services.stop_all()


def main() -> None:
    """Entry point: read ORZ_RUNNER_SPEC / ORZ_RUNNER_TOKEN, run until SIGTERM, exit 0 (2 on fatal)."""
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    quiet_libraries()
    if not settings.runner_spec:
        sys.exit("orz runner: ORZ_RUNNER_SPEC is not set (the provider passes the runner spec as JSON)")
    try:
        spec = RunnerSpec.model_validate_json(settings.runner_spec)
    except ValidationError as exc:
        reason = f"the runner spec is not valid: {describe_validation(exc)}"
        log.error("%s", reason)
        report_unstartable(settings.runner_spec, settings.runner_token.get_secret_value(), reason)
        sys.exit(EXIT_FATAL)
    if not spec.advertise_host and settings.runner_advertise_host:
        spec = spec.model_copy(update={"advertise_host": settings.runner_advertise_host})
    if spec.network_ready_file and not _network_ready(spec.network_ready_file):
        message = f"the session sandbox's network did not come up in {NETWORK_READY_TIMEOUT_S:.0f} s"
        with contextlib.suppress(OSError):  # the provider reports the session failed with this reason
            (Path(spec.state_dir) / STATE_FATAL_FILE).write_text(message + "\n", encoding="utf-8")
        sys.exit(f"orz runner: {message}")
    sys.exit(asyncio.run(_amain(spec, settings.runner_token.get_secret_value(), settings.runner_fast_path)))


def quiet_libraries() -> None:
    """One line per heartbeat (httpx) and per SSH connection (asyncssh) is noise in a session's log (kept
    with ORZ_LOG_LEVEL=debug)."""
    if logging.getLogger().level > logging.DEBUG:
        for name in ("httpx", "httpcore", "asyncssh"):
            logging.getLogger(name).setLevel(logging.WARNING)


def report_unstartable(raw_spec: str, token: str, reason: str) -> None:
    """A spec this runner cannot use still names its session, API and state dir: leave the reason where
    the provider looks (fatal_error) and fail the session on the API with it (one last heartbeat)."""
    try:
        fields = json.loads(raw_spec)
    except ValueError:
        return
    if not isinstance(fields, dict):
        return
    state_dir, session_id, api_url = (fields.get(k) for k in ("state_dir", "session_id", "api_url"))
    if isinstance(state_dir, str) and state_dir and "\x00" not in state_dir:
        with contextlib.suppress(OSError):
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            (Path(state_dir) / STATE_FATAL_FILE).write_text(reason + "\n", encoding="utf-8")
            (Path(state_dir) / STATE_RELEASED_FILE).write_text("ok\n", encoding="utf-8")
    if isinstance(session_id, str) and SESSION_ID_RE.match(session_id) and isinstance(api_url, str):
        asyncio.run(_last_heartbeat(api_url, token, session_id, reason))


async def _last_heartbeat(api_url: str, token: str, session_id: str, reason: str) -> None:
    activity = Activity()
    activity.fatal_error = reason
    try:
        async with ApiClient(api_url, token) as client:
            await HeartbeatLoop(client, session_id, activity, 1).flush()
    except Exception:  # best effort: the provider's fatal_error file still says why
        log.exception("could not report the invalid spec to %s", api_url)


async def _amain(spec: RunnerSpec, token: str, fast_path: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return await Runner(spec, token, os.environ, fast_path=fast_path).run(stop)


def _network_ready(marker: str) -> bool:
    """Wait for the launcher's marker (the runner's imports overlapped the sandbox's network set-up)."""
    deadline = time.monotonic() + NETWORK_READY_TIMEOUT_S
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
