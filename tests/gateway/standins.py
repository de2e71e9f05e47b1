"""Test stand-ins, each for a piece the gateway talks to over the network.

- ``FakeApi`` stands in for the API's internal routes (``POST /internal/v1/authorize``,
  ``/internal/v1/access-check``, ``/internal/v1/attach-events`` and ``/internal/v1/auth-failures``, whose
  window it does not age: a test lasts less than one): a real HTTP server (asyncio streams)
  that checks the service token and answers with the contract's JSON or problem+json. It lets gateway
  tests set a session's state directly (failed, stopped, slow to start); test_api_contract.py keeps it
  honest against the real API.
- ``FakeRunner`` stands in for the runner's internal SSH endpoint (runner/sshd.py, which
  test_e2e_runner.py puts behind the gateway instead): a real asyncssh server that accepts only the
  gateway's client key with user "rw"/"ro". A pty shell prints "hi" then echoes; exec runs ``sh -c``;
  sftp/scp serve a directory; direct-tcpip and tcpip-forward are allowed to loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from tests.support import serve_json


@dataclass
class FakeSession:
    owner: str
    state: str = "running"
    route: dict[str, Any] | None = None
    wake_polls: int = 0  # authorize calls a stopped session needs before it runs
    stopping_calls: int = 0  # authorize calls that find a stopping session still stopping; then it is stopped
    reason: str | None = None


@dataclass
class FakeApi:
    """The API's authorize rules, in the real API's order and words (tests/gateway/test_api_contract.py
    runs the same cases against both). Users belong to orgs; a session's org is its owner's."""

    service_token: str
    users: dict[str, str] = field(default_factory=dict)  # user id -> org
    admins: set[str] = field(default_factory=set)
    sessions: dict[str, FakeSession] = field(default_factory=dict)
    disabled_users: set[str] = field(default_factory=set)
    used_jti: set[str] = field(default_factory=set)
    events: list[dict[str, Any]] = field(default_factory=list)
    authorize_calls: list[dict[str, Any]] = field(default_factory=list)
    access_checks: int = 0  # POST /internal/v1/access-check calls
    auth_failures: dict[str, int] = field(default_factory=dict)  # source -> failures reported by any gateway
    auth_fail_limit: int = 10
    auth_fail_window_s: int = 60
    authorize_outage: int | None = None  # an HTTP status (503: a restart) every authorize call gets instead
    server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await serve_json(reader, writer, self._route)
        except asyncio.CancelledError:
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    def _problem(status: int, code: str, detail: str) -> tuple[int, dict[str, Any]]:
        return status, {"type": f"https://orz.cloud/problems/{code}", "title": code, "status": status,
                        "code": code, "detail": detail}

    def _route(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, Any] | None]:
        auth = headers.get("authorization")
        if auth is None:
            return self._problem(401, "unauthorized", "missing Authorization: Bearer <token> header")
        if auth != f"Bearer {self.service_token}":
            return self._problem(401, "unauthorized", "invalid service token")
        data = json.loads(body or b"{}")
        if method == "POST" and path == "/internal/v1/attach-events":
            if data.get("session_id") not in self.sessions:
                return self._problem(404, "not_found", f"no such session: {data.get('session_id')}")
            self.events.append(data)
            return 204, None
        if method == "POST" and path == "/internal/v1/auth-failures":
            source = data["source_address"]
            self.auth_failures[source] = failures = self.auth_failures.get(source, 0) + 1
            return 200, {"failures": failures, "limit": self.auth_fail_limit,
                         "retry_after_s": self.auth_fail_window_s if failures >= self.auth_fail_limit else 0}
        if method == "POST" and path == "/internal/v1/access-check":
            self.access_checks += 1
            return 200, {"revoked": [r for r in map(self._revocation, data["attachments"]) if r]}
        if method == "POST" and path == "/internal/v1/authorize":
            self.authorize_calls.append(data)
            if self.authorize_outage is not None:
                return self._problem(self.authorize_outage, "unavailable", "the API is starting")
            return self._authorize(data)
        return self._problem(404, "not_found", "no route")

    def _revocation(self, live: dict[str, str]) -> dict[str, str] | None:
        sid, user = live["session_id"], live["user_id"]
        reason = None
        if user in self.disabled_users:
            reason = "your account is disabled"
        elif sid not in self.sessions:
            reason = f"session {sid} was deleted"
        return {"session_id": sid, "user_id": user, "reason": reason} if reason else None

    def _authorize(self, req: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        sid, user = req["session_id"], req["user_id"]
        if user not in self.users:
            return self._problem(401, "unauthorized", "unknown user")
        if user in self.disabled_users:
            return self._problem(403, "forbidden", "your account is disabled")
        session = self.sessions.get(sid)
        if session is None or self.users.get(session.owner) != self.users[user] or session.state == "deleted":
            # Another org's session is indistinguishable from one that does not exist.
            return self._problem(404, "not_found", f"no such session: {sid}")
        if session.owner != user and user not in self.admins:
            return self._problem(403, "forbidden", f"session {sid} belongs to someone else in your org")
        if req.get("jti"):  # spent only once the user may attach at all
            if req["jti"] in self.used_jti:
                return self._problem(401, "unauthorized", "this attach token was already used; ask for a new one")
            self.used_jti.add(req["jti"])
        if session.state == "stopping":
            session.stopping_calls -= 1
            if session.stopping_calls < 0:
                session.state = "stopped"
        if session.state == "failed":
            return self._problem(409, "session_failed", f"session {sid} failed: {session.reason or 'unknown reason'}")
        if session.state == "stopped" and req.get("wake") is False:
            return self._problem(409, "conflict", f"session {sid} is stopped; start it with `orz cloud start {sid}`")
        if session.state == "stopped":
            session.state = "starting"
        elif session.state == "starting":
            session.wake_polls -= 1
            if session.wake_polls <= 0:
                session.state = "running"
        reply: dict[str, Any] = {"session_id": sid, "user_id": user, "state": session.state,
                                 "mode": "ro" if req.get("readonly") else "rw"}
        if session.state == "running" and session.route:
            reply["route"] = session.route
        else:
            reply["message"] = f"session {sid} is {session.state}"
        return 200, reply


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RunnerServer(asyncssh.SSHServer):
    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.runner.connections.append(conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username in ("rw", "ro") and key.public_data == self.runner.gateway_key.public_data

    def public_key_auth_supported(self) -> bool:
        return True

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return _loopback(dest_host)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return _loopback(listen_host)


class _SftpServer(asyncssh.SFTPServer):
    """asyncssh closes an sftp channel without an exit status; sshd sends 0 (scp checks it)."""

    def exit(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.exit(0)


@dataclass
class FakeRunner:
    gateway_key: asyncssh.SSHKey
    workspace: Path
    host_key: asyncssh.SSHKey = field(default_factory=lambda: asyncssh.generate_private_key("ssh-ed25519"))
    acceptor: asyncssh.SSHAcceptor | None = None
    term_sizes: list[tuple[int, int]] = field(default_factory=list)
    usernames: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)
    rekey_bytes: int | None = None  # start a key exchange after this many bytes sent (asyncssh: 1 GiB)
    commands_running: int = 0  # exec'd commands not yet reaped
    _commands: set[asyncio.subprocess.Process] = field(default_factory=set)
    connections: list[asyncssh.SSHServerConnection] = field(default_factory=list)  # from the gateway

    @property
    def route(self) -> dict[str, Any]:
        assert self.acceptor is not None
        return {"host": "127.0.0.1", "port": self.acceptor.get_port(),
                "host_key": self.host_key.export_public_key().decode().strip()}

    async def start(self) -> None:
        self.acceptor = await asyncssh.listen(
            "127.0.0.1", 0, server_factory=lambda: _RunnerServer(self), server_host_keys=[self.host_key],
            process_factory=self._process, encoding=None, line_editor=False, config=None,
            sftp_factory=lambda chan: _SftpServer(chan, chroot=str(self.workspace).encode()),
            allow_scp=True, agent_forwarding=False,
            **({"rekey_bytes": self.rekey_bytes} if self.rekey_bytes else {}),
        )

    def drop_connections(self) -> None:
        """The runner's process is gone (a stop, a crash): its connections end without a word."""
        for conn in self.connections:
            conn.abort()

    async def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            await self.acceptor.wait_closed()
        # Commands whose client went with the connection: killed and reaped now, not left to a loop that
        # is about to close (an unreaped one fails a later test with "subprocess N is still running").
        for proc in list(self._commands):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self.usernames.append(process.get_extra_info("username"))
        if process.get_terminal_type() and process.command is None:
            await self._tmux_like(process)
        else:
            await self._command(process)

    async def _tmux_like(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """The 'program' of the session says hi, then echoes what is typed (in upper case for 'ping')."""
        readonly = process.get_extra_info("username") == "ro"
        process.stdout.write(b"hi (read-only)\r\n" if readonly else b"hi\r\n")
        while True:
            try:
                data = await process.stdin.read(4096)
            except asyncssh.TerminalSizeChanged as change:
                self.term_sizes.append((change.width, change.height))
                process.stdout.write(f"size {change.width}x{change.height}\r\n".encode())
                continue
            except asyncssh.SignalReceived as sig:
                self.signals.append(sig.signal)
                continue
            except asyncssh.BreakReceived:
                self.signals.append("break")
                continue
            if not data:
                break
            if not readonly:
                process.stdout.write(b"pong\r\n" if data.strip() == b"ping" else data)
        process.exit(0)

    async def _command(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self.commands_running += 1
        try:
            await self._run_command(process)
        finally:
            self.commands_running -= 1

    async def _run_command(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        cmd = process.command or os.environ.get("SHELL", "/bin/sh")
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", cmd, cwd=self.workspace, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        self._commands.add(proc)
        try:
            await self._serve_command(process, proc)
        finally:
            if proc.returncode is None:  # cancelled: leave no process behind, reaped
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            self._commands.discard(proc)

    async def _serve_command(self, process: asyncssh.SSHServerProcess[bytes],
                             proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin and proc.stdout and proc.stderr

        async def pump_in() -> None:
            while data := await process.stdin.read(65536):
                proc.stdin.write(data)  # type: ignore[union-attr]
                await proc.stdin.drain()  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]

        async def pump_out(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
            except (OSError, asyncssh.Error):  # the channel closed under a write or a drain
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the client is gone: end the command and its children
                while await src.read(65536):
                    pass  # to the pipe's end, so it closes

        feeder = asyncio.create_task(pump_in())
        await asyncio.gather(pump_out(proc.stdout, process.stdout), pump_out(proc.stderr, process.stderr))
        status = await proc.wait()
        feeder.cancel()
        if process.channel.is_closing():
            return
        if status < 0:
            name = signal.Signals(-status).name.removeprefix("SIG")
            process.exit_with_signal(name, False, f"killed by {name}")
        else:
            process.exit(status)
