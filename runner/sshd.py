"""The runner's internal SSH endpoint: only the gateway's key gets in; user "rw" or "ro" is the mode.

A shell with a pty runs ``setup.onAttach`` and attaches to tmux; a shell or exec without a pty is a
plain command in the workspace; sftp and scp see the paths commands see (runner/paths.py); port
forwarding stays on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from api.schemas import CLIENT_AGENT_ENV, UNIX_ROUTE_PREFIX, client_env_allowed
from api.settings import ssh_algorithms
from gateway import splice, window
from gateway.cork import WithoutFiller
from runner.activity import Activity
from runner.paths import SessionSFTP, expand_login_home, serve_openssh_extensions
from runner.ptyproc import PtyChild, hang_up, killpg
from runner.reaping import reaped
from runner.tmux import Tmux

log = logging.getLogger(__name__)

MODES = ("rw", "ro")
# Only the gateway connects, and an unauthenticated peer may not hold a handshake open for long.
LOGIN_TIMEOUT_S = 15
READY_TIMEOUT_S = 600.0
# Stop reading a pty while this much output waits for a slow client (a `cat` of a big file).
PTY_BACKLOG_BYTES = 256 * 1024


@dataclass
class SessionHooks:
    """What the endpoint needs from the rest of the runner."""

    workspace: Path
    shell: str
    tmux: Tmux
    activity: Activity
    env: Callable[[], dict[str, str]]
    ensure_program: Callable[[], Awaitable[None]]
    ready: asyncio.Event
    on_attach: Callable[[], str | None] = lambda: None
    on_attach_timeout_s: float = 30.0
    login: str = ""  # the session id: the user name clients log in with (``~<login>`` is the home)

    def home(self) -> Path:
        return Path(self.env().get("HOME") or self.workspace)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_value(env: Mapping[Any, Any], name: str) -> str | None:
    value = env.get(name, env.get(name.encode()))
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def client_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of the client's environment a session may see: TERM, LANG and LC_*."""
    out: dict[str, str] = {}
    for key, value in env.items():
        if isinstance(key, bytes) or isinstance(value, bytes):
            key = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if client_env_allowed(key):
            out[key] = value
    return out


class _EndpointConnection(WithoutFiller, asyncssh.SSHServerConnection):
    """The endpoint's connection: no IGNORE filler ahead of each packet, and a pty session's keystrokes and
    output on the gateway's fast path (gateway.splice) while one is attached: per packet, one kept AES-GCM
    context and straight to or from the pty, instead of asyncssh's whole channel machinery."""

    def data_received(self, data: bytes, datatype: asyncssh.DataType = None) -> None:
        fast = self.fast_path
        if fast is None:
            super().data_received(data, datatype)
        else:
            fast.data_received(data)  # hands asyncssh (the method above this one) whatever it does not take

    # Channels count what they still buffer when they give window back (gateway.window): an upload into a
    # program that reads slower than the gateway sends must not pile up here, one window per pause.
    def create_server_channel(self, *args: Any, **kwargs: Any) -> asyncssh.SSHServerChannel[Any]:
        chan = super().create_server_channel(*args, **kwargs)
        window.hold_window(chan)
        return chan

    def create_tcp_channel(self, *args: Any, **kwargs: Any) -> asyncssh.SSHTCPChannel[Any]:
        chan = super().create_tcp_channel(*args, **kwargs)
        window.hold_window(chan)
        return chan


class _Connection(asyncssh.SSHServer):
    """Per-connection policy: public-key auth with the gateway key, loopback-only forwarding."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: asyncssh.SSHServerConnection | None = None
        self.username = ""
        self.counted = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        # asyncssh.create_server has no hook for the connection class; this runs before key exchange.
        conn.__class__ = _EndpointConnection
        if self.endpoint.fast_path:
            receive = super(_EndpointConnection, conn).data_received
            conn.fast_path = splice.FastPath(conn, asyncio.get_running_loop(), receive)  # type: ignore[attr-defined]
        self.conn = conn
        self.endpoint.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.endpoint.connections.discard(self.conn)
        if self.counted:
            self.endpoint.hooks.activity.connections -= 1
            self.endpoint.hooks.activity.poke()  # `orz cloud list` shows who is attached now, not a beat later
            self.endpoint.hooks.activity.rescan_work.set()
            self.counted = False

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ok = username in MODES and key.public_data == self.endpoint.gateway_key.public_data
        if not ok:
            log.warning("refused SSH key %s for user %r", key.get_fingerprint(), username)
        return ok

    def auth_completed(self) -> None:
        self.counted = True
        self.endpoint.hooks.activity.connections += 1
        self.endpoint.hooks.activity.poke()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        # Refused by policy, not by the destination: say so (OpenSSH prints "administratively prohibited"
        # and the reason), as sshd does for a forward its PermitOpen refuses.
        if self.username != "rw":
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "orz: a read-only attach cannot forward ports")
        if not is_loopback(dest_host):
            log.info("refused direct-tcpip to %s:%s", dest_host, dest_port)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"orz: forwarding to {dest_host}:{dest_port} is not allowed; only loopback addresses in "
                "the session (localhost, 127.0.0.1, ::1) can be forwarded to")
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> bool | Awaitable[asyncssh.SSHListener]:
        if self.username != "rw" or self.conn is None:
            return False
        if is_loopback(listen_host):
            return True
        if listen_host not in ("", "*", "0.0.0.0", "::"):  # noqa: S104  # nosec B104  # rewritten to loopback below
            log.info("refused remote forward on %s:%s", listen_host, listen_port)
            return False
        # "All interfaces" becomes loopback; the client still sees the address it asked for.
        return self.conn.forward_local_port("127.0.0.1", listen_port, listen_host, listen_port)


class Endpoint:
    """The asyncssh server; ``start`` generates the host key and binds (port 0 = any free port)."""

    def __init__(self, hooks: SessionHooks, gateway_public_key: str, host: str, port: int,
                 fast_path: bool = True) -> None:
        self.hooks = hooks
        self.fast_path = fast_path  # pty sessions' data on gateway.splice's fast path (False: all through asyncssh)
        self.gateway_key = asyncssh.import_public_key(gateway_public_key)
        self.host = host
        self.port = port
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._server: asyncssh.SSHAcceptor | None = None
        self._children: set[Callable[[], None]] = set()
        self.connections: set[asyncssh.SSHServerConnection] = set()

    @property
    def host_public_key(self) -> str:
        return self.host_key.export_public_key("openssh").decode().strip()

    async def start(self) -> int:
        """Listen; the TCP port bound, or 0 on a unix socket (``unix:PATH``, owner-only)."""
        where: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.host.startswith(UNIX_ROUTE_PREFIX):
            path = self.host[len(UNIX_ROUTE_PREFIX):]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            where = {"sock": sock}
        serve_openssh_extensions()
        self._server = await asyncssh.create_server(
            lambda: _Connection(self), **where,
            server_host_keys=[self.host_key], process_factory=self._handle, sftp_factory=self._sftp,
            allow_scp=True, encoding=None, line_editor=False, compression_algs=["none"],
            **ssh_algorithms(), agent_forwarding=True, x11_forwarding=False,  # the shared policy (issue 17)
            password_auth=False, kbdint_auth=False, login_timeout=LOGIN_TIMEOUT_S, keepalive_interval=30,
        )
        if "sock" in where:
            return 0
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for kill in list(self._children):
            kill()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        # Closing the listener leaves connections open (asyncssh): end them too, and wait for them.
        for conn in list(self.connections):
            conn.close()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5.0)

    # -- sessions ------------------------------------------------------------------------------

    def _sftp(self, chan: asyncssh.SSHServerChannel) -> asyncssh.SFTPServer:
        if chan.get_extra_info("username") != "rw":
            chan.exit(1)  # a read-only attach may look, not copy files in or out
        return SessionSFTP(chan, cwd=self.hooks.workspace, home=self.hooks.home(), login=self.hooks.login)

    async def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        try:
            await self._dispatch(process)
        except Exception:
            log.exception("session channel failed")
            with contextlib.suppress(Exception):
                process.exit(255)

    async def _dispatch(self, process: asyncssh.SSHServerProcess) -> None:
        readonly = process.get_extra_info("username") != "rw"
        term = process.get_terminal_type()
        command = process.command
        if process.subsystem:
            _fail(process, f"subsystem {process.subsystem} is not supported")
            return
        if readonly and (command is not None or term is None):
            _fail(process, "a read-only attach only gets the interactive terminal")
            return
        env = self.hooks.env()
        env.update(client_env(process.env))
        if command is not None:
            command = expand_login_home(command, self.hooks.login, str(self.hooks.home()))
        agent = process.channel.get_agent_path()
        if agent and _env_value(process.env, CLIENT_AGENT_ENV) != "no":
            env["SSH_AUTH_SOCK"] = agent
        if term is not None:
            env["TERM"] = term
            if command is None:
                await self._attach(process, env, readonly)
            else:
                await self._pty_command(process, env, [self.hooks.shell, "-c", command])
        else:
            argv = [self.hooks.shell, "-c", command] if command is not None else [self.hooks.shell, "-l"]
            await self._pipe_command(process, env, argv)

    async def _attach(self, process: asyncssh.SSHServerProcess, env: dict[str, str], readonly: bool) -> None:
        bridge = _PtyBridge(process, self.hooks.activity, readonly)
        try:
            if not self.hooks.ready.is_set():
                process.stdout.write(b"[orz] the session is starting...\r\n")
                await asyncio.wait_for(self.hooks.ready.wait(), READY_TIMEOUT_S)
            fatal = self.hooks.activity.fatal_error
            if fatal:
                _fail(process, fatal)
                return
            hook = self.hooks.on_attach()
            if hook:
                bridge.input_enabled = not readonly
                try:
                    code = await bridge.run([self.hooks.shell, "-c", hook], self.hooks.workspace, env,
                                            time_limit=self.hooks.on_attach_timeout_s)
                    if code != 0:
                        process.stdout.write(f"[orz] setup.onAttach exited with {code}\r\n".encode())
                except TimeoutError:
                    process.stdout.write(
                        f"[orz] setup.onAttach timed out after {self.hooks.on_attach_timeout_s:.0f}s\r\n"
                        .encode())
                bridge.input_enabled = True
            await self.hooks.ensure_program()
            env.pop("TMUX", None)
            code = await bridge.run(self.hooks.tmux.attach_argv(readonly), self.hooks.workspace, env)
            process.exit(code)
        finally:
            bridge.close()

    async def _pty_command(self, process: asyncssh.SSHServerProcess, env: dict[str, str],
                           argv: list[str]) -> None:
        bridge = _PtyBridge(process, self.hooks.activity, readonly=False)
        try:
            code = await bridge.run(argv, self.hooks.workspace, env)
            _exit(process, code)
        finally:
            bridge.close()

    async def _pipe_command(self, process: asyncssh.SSHServerProcess, env: dict[str, str],
                            argv: list[str]) -> None:
        out_fd, out_reader, out_pipe = await _output_pipe()
        try:
            err_fd, err_reader, err_pipe = await _output_pipe()
        except BaseException:
            os.close(out_fd)
            out_pipe.close()
            raise
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=self.hooks.workspace, env=env, stdin=asyncio.subprocess.PIPE,
                stdout=out_fd, stderr=err_fd, start_new_session=True,
            )
        except BaseException:
            out_pipe.close()
            err_pipe.close()
            raise
        finally:
            os.close(out_fd)
            os.close(err_fd)

        def kill() -> None:
            if proc.returncode is None:
                killpg(proc.pid, signal.SIGKILL)

        def client_gone() -> None:
            # As sshd does: close our ends of the command's pipes (it reads end-of-file, and a write gets
            # EPIPE) and send SIGHUP; it may still finish what it was doing (rsync --partial keeps the
            # part it received). SIGKILL only if it still runs after a grace period.
            with contextlib.suppress(Exception):
                proc.stdin.close()  # type: ignore[union-attr]
            out_pipe.close()
            err_pipe.close()
            hang_up(proc)

        async def until_exit() -> int:
            await asyncio.gather(_copy(out_reader, process.stdout), _copy(err_reader, process.stderr))
            return await proc.wait()

        self._children.add(kill)
        watcher = asyncio.create_task(_when_closed(process, client_gone))
        feeder = asyncio.create_task(self._feed(process, proc))
        try:
            # Cancelled (the runner stopping), the command's group is killed and reaped before we go on.
            _exit(process, await reaped(proc, until_exit(), group=True))
        finally:
            feeder.cancel()
            watcher.cancel()
            out_pipe.close()
            err_pipe.close()
            kill()
            self._children.discard(kill)

    async def _feed(self, process: asyncssh.SSHServerProcess, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        try:
            while True:
                try:
                    data = await process.stdin.read(65536)
                except asyncssh.SignalReceived as exc:
                    with contextlib.suppress(ProcessLookupError, ValueError, AttributeError):
                        proc.send_signal(getattr(signal, f"SIG{exc.signal}"))
                    continue
                except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                    continue
                if not data:
                    break
                self.hooks.activity.note_input()
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, asyncssh.DisconnectError):
            pass
        finally:
            with contextlib.suppress(Exception):
                proc.stdin.close()


TYPEAHEAD_MAX_BYTES = 64 * 1024


class _PtyBridge:
    """Feeds one SSH channel's input to whichever pty program currently runs on it."""

    def __init__(self, process: asyncssh.SSHServerProcess, activity: Activity, readonly: bool) -> None:
        self.process = process
        self.activity = activity
        self.readonly = readonly
        self.input_enabled = True
        cols, rows, _, _ = process.get_terminal_size()
        self.cols, self.rows = cols or 80, rows or 24
        self.child: PtyChild | None = None
        # Keys typed while no program runs yet (the handshake, tmux starting) go to the next one, as a
        # terminal's typeahead would, instead of being dropped.
        self._typeahead = bytearray()
        self._drain: asyncio.Task[None] | None = None
        self._pump = asyncio.create_task(self._read_input())
        self._watch = asyncio.create_task(_when_closed(process, self._hang_up_child))
        # Keys reach the program as the channel delivers them, not a loop turn later through the stdin
        # stream (measured: one task wake-up less per keystroke). Resizes, signals and the end of input
        # still come through the stream, and data waits behind anything queued there, so order holds.
        self._stream_data = process.data_received
        process.data_received = self._data_received  # type: ignore[method-assign]
        # Faster still when the connection has a fast path (gateway.splice): keys go from the socket to the
        # pty and output from the pty to the socket, each sealed or opened with a kept AES-GCM context,
        # without asyncssh's per-packet channel path; anything unusual still goes through asyncssh.
        self._chan = process.channel
        queued = getattr(process, "_recv_buf", None)
        self._fast = (splice.deliver_locally(self._chan, self._input, lambda: not queued.get(None))
                      if queued is not None else None)

    async def run(self, argv: list[str], cwd: Path, env: Mapping[str, str],
                  time_limit: float | None = None) -> int:
        self.child = await PtyChild.spawn(argv, cwd=cwd, env=env, cols=self.cols, rows=self.rows,
                                          on_output=self._output)
        if self._typeahead:
            self.child.write(bytes(self._typeahead))
            self._typeahead.clear()
        try:
            return await self.child.wait(time_limit)
        finally:
            self.child = None

    def _output(self, data: bytes) -> None:
        fast = self._fast
        if fast is not None and fast.send_data(self._chan, data):
            return  # (send_data declines whenever asyncssh holds data for the channel or its window is short)
        try:
            self.process.stdout.write(data)
        except (BrokenPipeError, OSError, asyncssh.Error):
            self._hang_up_child()
            return
        child = self.child
        if child is not None and self.process.channel.get_write_buffer_size() > PTY_BACKLOG_BYTES:
            child.pause_reading()
            self._drain = asyncio.create_task(self._resume_after_drain(child))

    async def _resume_after_drain(self, child: PtyChild) -> None:
        with contextlib.suppress(Exception):
            await self.process.stdout.drain()
        child.resume_reading()

    def _kill_child(self) -> None:
        if self.child is not None:
            self.child.kill()

    def _hang_up_child(self) -> None:
        if self.child is not None:
            self.child.hang_up()

    async def _read_input(self) -> None:
        while True:
            try:
                data = await self.process.stdin.read(65536)
            except asyncssh.TerminalSizeChanged as exc:
                self.cols, self.rows = exc.width, exc.height
                if self.child is not None:
                    self.child.resize(exc.width, exc.height)
                continue
            except asyncssh.SignalReceived as exc:
                if self.child is not None and not self.readonly:
                    with contextlib.suppress(AttributeError):
                        self.child.signal(getattr(signal, f"SIG{exc.signal}"))
                continue
            except asyncssh.BreakReceived:
                continue
            except (asyncssh.Error, BrokenPipeError, ConnectionError):
                data = b""
            if not data:
                # End of input (``ssh -n -tt``, paramiko's stdin.close()) is not a hang-up: as under sshd
                # the program runs on and its output and exit status still reach the client. A client
                # that goes away closes the channel, and ``_watch`` takes the program down then.
                return
            self._input(data)

    def _data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        # Straight to the pty only when nothing is queued ahead in asyncssh's stream (order); an asyncssh
        # without that private buffer gets the stream path, slower but correct.
        queued = getattr(self.process, "_recv_buf", None)
        if datatype is None and queued is not None and not queued.get(None):
            self._input(data)
        else:
            self._stream_data(data, datatype)

    def _input(self, data: bytes) -> None:
        """Keys from the client: to the program, or kept for the next one while none runs."""
        if not self.input_enabled:
            return
        self.activity.note_input()
        if self.child is not None:
            self.child.write(data)
        elif len(self._typeahead) + len(data) <= TYPEAHEAD_MAX_BYTES:
            self._typeahead += data

    def close(self) -> None:
        if self._fast is not None:
            splice.forget(self._chan)
            self._fast = None
        with contextlib.suppress(AttributeError):
            del self.process.data_received  # back to the stream
        self._pump.cancel()
        self._watch.cancel()
        self._kill_child()


async def _when_closed(process: asyncssh.SSHServerProcess, then: Callable[[], None]) -> None:
    await process.channel.wait_closed()
    then()


async def _output_pipe() -> tuple[int, asyncio.StreamReader, asyncio.ReadTransport]:
    """A pipe for a command's stdout or stderr: (write end for the child, reader, read transport).

    Ours rather than asyncio's PIPE so its read end can be closed while the command runs, as sshd closes
    its end when the client goes away: a command still writing then gets EPIPE instead of blocking.
    """
    read_fd, write_fd = os.pipe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                                    os.fdopen(read_fd, "rb", buffering=0))
    except BaseException:
        os.close(write_fd)
        raise
    return write_fd, reader, transport


async def _copy(reader: asyncio.StreamReader, writer: asyncssh.SSHWriter) -> None:
    while chunk := await reader.read(65536):
        try:
            writer.write(chunk)
            await writer.drain()
        except (BrokenPipeError, OSError, asyncssh.Error):
            return


def _exit(process: asyncssh.SSHServerProcess, code: int) -> None:
    if code < 0:
        with contextlib.suppress(ValueError):
            process.exit_with_signal(signal.Signals(-code).name.removeprefix("SIG"))
            return
    process.exit(code & 0xFF if code >= 0 else 255)


def _fail(process: asyncssh.SSHServerProcess, message: str) -> None:
    process.stderr.write(f"orz: {message}\r\n".encode())
    process.exit(1)
