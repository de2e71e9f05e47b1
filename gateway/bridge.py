"""Bridge one client connection's channels to its session's runner over one upstream SSH connection."""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from api.schemas import CLIENT_AGENT_ENV, Route, client_env_allowed
from api.settings import ssh_algorithms
from gateway import idle, splice, window
from gateway.cork import CorkedTunnel, TurnBatcher
from gateway.errors import AttachRefused, UpstreamUnavailable

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
# The largest packet the runner may send on a bridged channel (asyncssh's default is 32 KiB). Bulk from the
# runner (a download's SFTP replies of up to 255 KiB, a pty read of 64 KiB) then crosses the internal hop
# as one packet instead of eight: measured, 20-25% less runner CPU per MiB downloaded. The gateway still
# sends the client packets no larger than the client allows.
UPSTREAM_MAX_PACKET = 256 * 1024
UPSTREAM_CONNECT_TIMEOUT_S = 15


# Progress (a session waking) reads as information, like the runner's own "[orz] the session is starting...";
# "orz: " starts the one line that says why something failed.
PROGRESS_PREFIX = "[orz] "
AGENT_SETUP_YIELDS = 5


async def _client_agent(chan: asyncssh.SSHServerChannel[bytes]) -> bool:
    """Whether the client forwarded its agent (ssh -A). asyncssh sets up the agent listener in a task of
    its own after the request, which comes before the shell or exec request: let that task finish."""
    for _ in range(AGENT_SETUP_YIELDS):
        if chan.get_agent_path():
            return True
        await asyncio.sleep(0)
    return bool(chan.get_agent_path())


def allowed_env(env: dict[str, str]) -> dict[str, str]:
    """Only locale and terminal variables cross to the runner."""
    return {k: v for k, v in env.items() if client_env_allowed(k)}


@dataclass(slots=True)
class Counters:
    bytes_in: int = 0  # client -> session
    bytes_out: int = 0  # session -> client

    def add_in(self, n: int) -> None:
        self.bytes_in += n

    def add_out(self, n: int) -> None:
        self.bytes_out += n


class _UpstreamOwner(asyncssh.SSHClient):
    """The upstream connection's owner: calls `on_lost` when the connection is gone."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self._on_lost = on_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


# asyncssh's client options ask getpass.getuser() on every connect: a passwd lookup (a file opened per attach,
# which fails when descriptors run out) that fails outright for a uid without a passwd entry (OpenShift's
# arbitrary uids, a chart's own runAsUser). The name plays no part in the internal connection, whose user
# is the mode ("rw"/"ro"), so the gateway names itself once, at start.
_LOGIN_ENV = ("LOGNAME", "USER", "LNAME", "USERNAME")  # what getpass.getuser() reads first, in order
FALLBACK_LOCAL_USER = "orz-gateway"


def pin_local_username() -> str:
    """Make sure getpass.getuser() answers from the environment from now on; the name it gives."""
    for name in _LOGIN_ENV:
        if os.environ.get(name):
            return os.environ[name]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (3.11 raises KeyError, 3.13 OSError)
        user = FALLBACK_LOCAL_USER
    os.environ["LOGNAME"] = user
    return user


# What the upstream connection calls itself, and at most how much of the user's client's version it adds.
UPSTREAM_SOFTWARE = "OrzbobGateway"
_MAX_RELAYED_VERSION = 160


def upstream_version(client_version: str) -> str:
    """The version string of the upstream connection: the gateway's name, then the user's client's software.

    The runner's asyncssh SFTP server reads SYMLINK's two paths in the order the client's version string
    implies (OpenSSH and paramiko send them reversed against the draft): through the gateway that client is
    the gateway, so without the user's software named here `sftp> symlink a b` made b's link at a."""
    software = client_version.removeprefix("SSH-2.0-")
    relayed = "".join(c for c in software if " " <= c <= "~")[:_MAX_RELAYED_VERSION]
    return f"{UPSTREAM_SOFTWARE} {relayed}" if relayed else UPSTREAM_SOFTWARE


async def connect_upstream(route: Route, mode: str, client_key: asyncssh.SSHKey, *,
                           agent_path: str | None = None, client_version: str = "",
                           on_lost: Callable[[], None] | None = None) -> asyncssh.SSHClientConnection:
    """Open the one internal connection, pinning the runner's host key (no other key is trusted).
    `client_version` is the user's client's SSH version string (see upstream_version); `on_lost` is called
    when it closes (also if it fails to open)."""
    try:
        host_key = asyncssh.import_public_key(route.host_key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise UpstreamUnavailable("session is not reachable right now", internal="bad host key") from exc
    try:
        conn = await asyncssh.connect(
            route.host, route.port, username=mode, client_keys=[client_key],
            client_version=upstream_version(client_version),
            known_hosts=([host_key], [], []), config=None, agent_path=None,
            agent_forwarding=agent_path or False, preferred_auth="publickey", password=None,
            kbdint_auth=False, **ssh_algorithms(), compression_algs=None,
            keepalive_interval=KEEPALIVE_S, connect_timeout=UPSTREAM_CONNECT_TIMEOUT_S,
            tunnel=CorkedTunnel(), **({"client_factory": lambda: _UpstreamOwner(on_lost)} if on_lost else {}),
        )
    except (TimeoutError, OSError, ValueError, asyncssh.Error) as exc:  # ValueError: asyncssh's option checks
        raise UpstreamUnavailable("session is not reachable right now", internal=repr(exc)) from exc
    idle.after_client_auth(conn)  # what asyncssh keeps but needed only to connect (idle memory per session)
    return conn


class Attachment:
    """Per client connection: the upstream connection (once ready), counters and progress lines."""

    __slots__ = ("_progress_listeners", "_ready", "_reauthorize", "agent_wanted", "counters", "progress_lines",
                 "sessions")

    def __init__(self, reauthorize: Callable[[], Awaitable[None]] | None = None,
                 agent_wanted: Callable[[], Awaitable[None]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[asyncssh.SSHClientConnection] = loop.create_future()
        self.counters = Counters()
        self.progress_lines: list[str] = []
        self._progress_listeners: list[Callable[[str], None]] = []
        # Asks the API again whether this user may still reach the session; raises AttachRefused if not.
        self._reauthorize = reauthorize
        # Open session channels, for a revocation to close (a list: one or two, where a set is 216 bytes).
        self.sessions: list[BridgeSession] = []
        # Makes the runner's agent requests reachable: called before a channel of a client with ssh -A opens.
        self.agent_wanted = agent_wanted

    def progress(self, line: str) -> None:
        self.progress_lines.append(line)
        for listener in list(self._progress_listeners):
            listener(line)

    def on_progress(self, listener: Callable[[str], None]) -> Callable[[], None]:
        for line in self.progress_lines:
            listener(line)
        self._progress_listeners.append(listener)
        return lambda: self._progress_listeners.remove(listener)

    def set_upstream(self, conn: asyncssh.SSHClientConnection) -> None:
        if not self._ready.done():
            self._ready.set_result(conn)
        else:
            conn.close()

    def refuse(self, error: AttachRefused | UpstreamUnavailable) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # mark retrieved: not every connection opens a channel

    async def upstream(self) -> asyncssh.SSHClientConnection:
        return await asyncio.shield(self._ready)

    async def for_new_channel(self) -> asyncssh.SSHClientConnection:
        """The upstream connection for a channel the client opens, once the API says yes again.

        Every channel open is re-authorized (a disabled user's live connection opens nothing new; what an
        API that cannot answer means is the re-authorizer's call, gateway.server); the API call runs while
        the upstream connection is still being set up, so a first attach waits for the slower of the two,
        not both.
        """
        if self._reauthorize is None:
            return await self.upstream()
        conn, _ = await asyncio.gather(self.upstream(), self._reauthorize())
        return conn

    def upstream_now(self) -> asyncssh.SSHClientConnection | None:
        if self._ready.done() and not self._ready.cancelled() and self._ready.exception() is None:
            return self._ready.result()
        return None

    def close(self) -> None:
        conn = self.upstream_now()
        if conn is not None:
            conn.close()
        elif not self._ready.done():
            self._ready.cancel()


class _UpstreamSession(asyncssh.SSHClientSession[bytes]):
    """Runner side of a bridged session: relays output, exit status and signals to the client."""

    def __init__(self, down: BridgeSession) -> None:
        self._down = down
        self.exit_status: int | None = None
        self.exit_signal: tuple[str, bool, str, str] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        window.hold_window(chan)  # paused while the client lags: hold one window of the runner's output
        idle.lean_close_event(chan)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._down.from_upstream(data, datatype)

    def eof_received(self) -> bool:
        self._down.upstream_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        self._down.pause_client()

    def resume_writing(self) -> None:
        self._down.resume_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._down.upstream_closed(self)


READONLY_REFUSAL = ("this attach is read-only: it shows the session's terminal, and runs no commands, sftp or "
                    "scp (get a read-write certificate: orz cloud cert ID, or orz cloud agent)")


class BridgeSession(asyncssh.SSHServerSession[bytes]):
    """Client side of a bridged session (shell, exec, sftp/scp): opens its twin on the runner."""

    def __init__(self, attachment: Attachment, *, readonly: bool, fast_path: bool = True) -> None:
        self._attachment = attachment
        self._readonly = readonly
        self._fast_path = fast_path
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._up: asyncssh.SSHClientChannel[bytes] | None = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._pty = False
        self._command: str | None = None
        self._subsystem: str | None = None
        self._out: TurnBatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop_progress: Callable[[], None] | None = None
        self._runner_full = False  # the runner's channel asked the client's to pause
        self._refusal: str | None = None  # why this channel's request is refused (a read-only attach's exec)

    # -- requests from the client -----------------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan
        window.hold_window(chan)  # paused while the runner lags: hold one window of the client's input
        idle.lean_close_event(chan)
        self._out = TurnBatcher(self._write_out, asyncio.get_running_loop())
        self._attachment.sessions.append(self)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: dict[int, int]) -> bool:
        self._pty = True
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        if self._readonly:
            # Accepted only to say why on stderr and exit 1 (session_started); nothing reaches the runner.
            # A refused request leaves ssh with "exec request failed on channel 0" and no reason.
            self._refusal = READONLY_REFUSAL
            return True
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != "sftp":
            return False
        if self._readonly:
            self._refusal = READONLY_REFUSAL
            return True
        self._subsystem = subsystem
        return True

    def session_started(self) -> None:
        if self._refusal is not None:
            self._fail(self._refusal)
            return
        self._task = asyncio.get_running_loop().create_task(self._open_upstream())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._attachment.counters.bytes_in += len(data)
        if self._up is not None:
            self._up.write(data)
        else:
            self._pending.append(data)
            # Nothing to relay to until the runner's channel is open: the rest waits in the client's
            # window (else an upload piles up here for as long as the open takes).
            if self._chan is not None:
                self._chan.pause_reading()

    def eof_received(self) -> bool:
        if self._up is not None:
            self._up.write_eof()
        else:
            self._pending_eof = True
        return True  # keep our half open: output may still come back

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._up is not None:
            self._up.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self._up is not None:
            self._up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._up is None:
            return False
        self._up.send_break(msec)
        return True

    def pause_writing(self) -> None:
        if self._up is not None:
            self._up.pause_reading()

    def resume_writing(self) -> None:
        if self._up is not None:
            self._up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self._attachment.sessions:
            self._attachment.sessions.remove(self)
        if self._stop_progress:
            self._stop_progress()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        splice.unsplice(self._chan, self._up)
        if self._up is not None:
            self._up.close()

    # -- upstream ---------------------------------------------------------------------------------

    async def _open_upstream(self) -> None:
        try:
            await self._bridge_upstream()
        finally:
            self._task = None  # a finished task keeps its coroutine object: not for the session's life

    async def _bridge_upstream(self) -> None:
        chan = self._chan
        assert chan is not None
        if not self._attachment.upstream_now():
            self._stop_progress = self._attachment.on_progress(self._progress)
        try:
            conn = await self._attachment.for_new_channel()
            self._stop_progress_now()
            term: dict[str, Any] = {"request_pty": False}
            if self._pty:
                term = {"request_pty": "force", "term_type": chan.get_terminal_type(),
                        "term_size": chan.get_terminal_size(), "term_modes": chan.get_terminal_modes()}
            env = allowed_env(dict(chan.get_environment()))
            # The upstream connection always offers agent forwarding (for clients that ask); the runner sets
            # SSH_AUTH_SOCK only for a client that did (ssh -A), else a session has a dead agent socket.
            forwarded = await _client_agent(chan)
            if forwarded and self._attachment.agent_wanted is not None:
                await self._attachment.agent_wanted()
            env[CLIENT_AGENT_ENV] = "yes" if forwarded else "no"
            self._up, _ = await conn.create_session(
                lambda: _UpstreamSession(self), self._command, subsystem=self._subsystem,
                env=env, encoding=None, max_pktsize=UPSTREAM_MAX_PACKET, **term,
            )
        except (AttachRefused, UpstreamUnavailable) as exc:
            self._fail(exc.line)
            return
        except (asyncssh.Error, OSError) as exc:
            log.info("upstream session refused: %r", exc)
            self._fail("the session refused this request")
            return
        for data in self._pending:
            self._up.write(data)
        self._pending.clear()
        if self._pending_eof:
            self._up.write_eof()
        if not self._runner_full:
            chan.resume_reading()  # what waited in the client's window goes to the runner now
        if self._fast_path:
            # From here on the pair's steady-state data skips asyncssh's channel machinery (gateway.splice).
            assert self._out is not None
            counters = self._attachment.counters
            splice.splice(chan, self._up, to_upstream=counters.add_in, to_client=counters.add_out,
                          client_idle=self._out.idle)
        if not chan.is_closing():
            # Settled: what these channels and connections hold alike moves to their classes (idle memory).
            for settled in (chan, self._up, chan.get_connection(), conn):
                idle.share_constants(settled, settled=True)

    def _stop_progress_now(self) -> None:
        if self._stop_progress:
            self._stop_progress()
            self._stop_progress = None

    def _writable(self) -> bool:
        """The client's channel still takes output: after a hang-up asyncssh raises BrokenPipeError."""
        return self._chan is not None and not self._chan.is_closing()

    def _say(self, line: str, prefix: str = "orz: ") -> None:
        """A line on the client's stderr: "orz: " for why something failed, "[orz] " for progress."""
        if self._chan is not None and self._writable():
            end = "\r\n" if self._pty else "\n"
            self._chan.write_stderr(f"{prefix}{line}{end}".encode())

    def _progress(self, line: str) -> None:
        self._say(line, PROGRESS_PREFIX)

    def _fail(self, line: str) -> None:
        self._stop_progress_now()
        self._say(line)
        if self._chan is not None:
            self._chan.exit(1)

    def notify(self, text: str) -> None:
        """A line for a terminal (the gateway is draining). Only a pty shell or pty command shows it: an
        exec or sftp channel's streams are data, and nothing is ever written into them."""
        if not self._pty or self._subsystem is not None or self._chan is None or not self._writable():
            return
        if self._out is not None:
            self._out.flush()  # after the output already on its way
        self._chan.write_stderr(text.encode())

    def revoke(self, line: str) -> None:
        """Access was withdrawn: the user reads why, then the channel (and its runner twin) closes."""
        if self._out is not None:
            self._out.flush()
        self._fail(line)
        if self._up is not None:
            self._up.close()

    def _write_out(self, data: bytes) -> None:
        # Also runs from the coalescer's end-of-turn callback, which may come after the client hung up.
        if self._chan is not None and self._writable():
            self._chan.write(data)

    def from_upstream(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._attachment.counters.bytes_out += len(data)
        assert self._out is not None and self._chan is not None
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._out.flush()  # keep stdout written before this stderr ahead of it
            if self._writable():
                self._chan.write_stderr(data)
        else:
            self._out.add(data)

    def upstream_eof(self) -> None:
        if self._out is not None and self._chan is not None:
            self._out.flush()
            if self._writable():
                self._chan.write_eof()

    def upstream_closed(self, up: _UpstreamSession) -> None:
        chan = self._chan
        splice.unsplice(chan, self._up)
        if chan is None:
            return
        if self._out is not None:
            self._out.flush()
        if up.exit_signal is not None:
            signal, core, msg, lang = up.exit_signal
            chan.exit_with_signal(signal, core, msg, lang)
        elif up.exit_status is not None:
            chan.exit(up.exit_status)
        else:
            chan.close()  # mirror the runner: no status was sent, so none is invented

    def pause_client(self) -> None:
        self._runner_full = True
        if self._chan is not None:
            self._chan.pause_reading()

    def resume_client(self) -> None:
        self._runner_full = False
        if self._chan is not None:
            self._chan.resume_reading()
