"""After the upgrade: a WebSocket bridged to the runner's tmux (terminal), or to our own SSH port (tunnel).

Terminal protocol: binary frames are raw terminal bytes both ways; text frames are small JSON control
messages. Browser -> gateway: ``{"type": "resize", "cols": C, "rows": R}``. Gateway -> browser, only to a
client that asked for subprotocol ``orz.terminal.v1`` (the page does):
``{"type": "status", "message": ...}`` while a session wakes, ``{"type": "attached", "mode": "rw"|"ro"}``,
``{"type": "error", "message": ...}`` before a refusal close, ``{"type": "exit", "status": N}`` at the end.
A client that did not ask (the Go CLI, which writes every frame it gets to the terminal) gets terminal
bytes only: wake progress and refusals as ``orz: ...`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import asyncssh
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from api.schemas import AttachEventIn
from gateway import drain, metrics
from gateway.bridge import Counters, connect_upstream
from gateway.errors import AttachRefused, UpstreamUnavailable

if TYPE_CHECKING:
    from gateway.server import Gateway
    from gateway.web import Grant

log = logging.getLogger(__name__)

TERM = "xterm-256color"
READ_CHUNK = 64 * 1024
# Close codes the page understands: 1000 the session ended or detached; 4001 a refusal after the upgrade.
CLOSE_REFUSED = 4001
# The WebSocket subprotocol of clients that read the JSON control messages (gateway/static/terminal.js).
CONTROL_PROTOCOL = "orz.terminal.v1"
LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}  # noqa: S104  # nosec B104  # maps wildcards to loopback, binds nothing


async def terminal(gw: Gateway, ws: ServerConnection, grant: Grant) -> None:
    """The browser terminal, holding one of its user's attach slots (gateway/preauth.py) while it lasts."""
    user_id = grant.principal.user_id
    if not gw.attach_slots.take(user_id):
        log.info("web %s: attach to %s refused: the user has %d connections open here", grant.id, grant.session_id,
                 gw.attach_slots.limit)
        metrics.attach_failed("web", "too_many_connections")
        await refuse(ws, gw.attach_slots.refusal(), control=wants_control(ws))
        return
    try:
        await _terminal(gw, ws, grant)
    finally:
        gw.attach_slots.give(user_id)


async def _terminal(gw: Gateway, ws: ServerConnection, grant: Grant) -> None:
    """The browser terminal: one upstream SSH session with a pty, i.e. onAttach, then tmux attach."""
    counters = Counters()
    authorized_at = time.monotonic()  # the credential was checked just before the upgrade
    control = wants_control(ws)

    def progress(line: str) -> None:
        if control:
            gw.spawn(_send_json(ws, {"type": "status", "message": line}))
        else:
            gw.spawn(_send_line(ws, f"orz: {line}"))

    try:
        reply = await gw.router.until_running(grant.session_id, grant.principal, grant.reply,
                                              source=grant.source, progress=progress)
        assert reply.route is not None
        upstream = await connect_upstream(reply.route, reply.mode, gw.client_key)
    except (AttachRefused, UpstreamUnavailable) as exc:
        log.info("web %s: attach to %s failed: %s", grant.id, grant.session_id, exc.internal or exc.line)
        metrics.attach_failed("web", exc.code)
        await refuse(ws, exc.line, control=control)
        return
    readonly = reply.mode == "ro" or grant.principal.readonly
    attached_at: float | None = None
    try:
        async with upstream:
            stdin, stdout, _ = await upstream.open_session(
                request_pty="force", term_type=TERM, term_size=(grant.cols, grant.rows), encoding=None,
                env={"LANG": "C.UTF-8"})
            log.info("web %s from %s attached to %s (%s)", grant.id, grant.source, grant.session_id, reply.mode,
                     extra={"event": "attached", "conn_id": grant.id, "session_id": grant.session_id,
                            "user_id": grant.principal.user_id, "source": grant.source, "mode": reply.mode})
            if control:
                await _send_json(ws, {"type": "attached", "mode": "ro" if readonly else "rw"})
            attached_at = time.monotonic()
            metrics.attached("web", attached_at - authorized_at)
            await gw.router.report(AttachEventIn(
                session_id=grant.session_id, user_id=grant.principal.user_id, event="attached",
                connection_id=grant.id, source_address=grant.source))
            live = LiveTerminal(gw, ws, grant)
            gw.web_terminals.add(live)
            try:
                await _first_done(_session_to_ws(stdout, ws, counters),
                                  _ws_to_session(ws, stdin, counters, readonly=readonly))
            finally:
                gw.web_terminals.discard(live)
            stdin.channel.close()
            await stdin.channel.wait_closed()
            status = stdin.channel.get_exit_status()
            with contextlib.suppress(ConnectionClosed):
                if control:
                    await _send_json(ws, {"type": "exit", "status": status})
                await ws.close(1000, "session ended")
    except (asyncssh.Error, OSError) as exc:
        log.info("web %s: session on %s refused: %r", grant.id, grant.session_id, exc)
        if attached_at is None:
            metrics.attach_failed("web", "upstream_unavailable")
        await refuse(ws, "the session refused this request", control=control)
    finally:
        if attached_at is not None:
            metrics.detached("web", counters.bytes_in, counters.bytes_out)
            await _report_detached(gw, grant, counters, attached_at)


class LiveTerminal:
    """A browser terminal as the gateway's access watch sees it (gateway/revocation.py)."""

    def __init__(self, gw: Gateway, ws: ServerConnection, grant: Grant) -> None:
        self.gw, self.ws, self.grant = gw, ws, grant
        self.revoked = False

    def live(self) -> tuple[str, str] | None:
        return None if self.revoked else (self.grant.session_id, self.grant.principal.user_id)

    def draining(self) -> None:
        """The gateway is shutting down: the terminal shows the line; the page keeps the session."""
        self.gw.spawn(_send_raw(self.ws, drain.terminal_notice(self.grant.session_id).encode()))

    def draining_ended(self) -> None:
        self.gw.spawn(refuse(self.ws, drain.web_refusal().removeprefix("orz: "), control=wants_control(self.ws)))

    def revoke(self, reason: str) -> None:
        self.revoked = True
        log.info("web %s: access to %s withdrawn: %s", self.grant.id, self.grant.session_id, reason)
        metrics.revoked("web")
        self.gw.spawn(refuse(self.ws, reason, control=wants_control(self.ws)))  # closing it ends the bridge


async def _report_detached(gw: Gateway, grant: Grant, counters: Counters, attached_at: float) -> None:
    await gw.router.report(AttachEventIn(
        session_id=grant.session_id, user_id=grant.principal.user_id, event="detached",
        connection_id=grant.id, source_address=grant.source, bytes_in=counters.bytes_in,
        bytes_out=counters.bytes_out, duration_s=max(0.0, time.monotonic() - attached_at)))
    duration = max(0.0, time.monotonic() - attached_at)
    log.info("web %s detached from %s after %.1f s (in %d B, out %d B)", grant.id, grant.session_id, duration,
             counters.bytes_in, counters.bytes_out,
             extra={"event": "detached", "conn_id": grant.id, "session_id": grant.session_id,
                    "user_id": grant.principal.user_id, "source": grant.source, "duration_s": round(duration, 3),
                    "bytes_in": counters.bytes_in, "bytes_out": counters.bytes_out})


async def _session_to_ws(stdout: asyncssh.SSHReader[bytes], ws: ServerConnection, counters: Counters) -> None:
    while True:
        data = await stdout.read(READ_CHUNK)
        if not data:
            return
        counters.bytes_out += len(data)
        await ws.send(data)


async def _ws_to_session(ws: ServerConnection, stdin: asyncssh.SSHWriter[bytes], counters: Counters, *,
                         readonly: bool) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if isinstance(message, str):
                _control(message, stdin.channel)
            elif not readonly:  # tmux's read-only client would ignore keys too; do not even carry them
                counters.bytes_in += len(message)
                stdin.write(message)
                await stdin.drain()


def _control(message: str, chan: asyncssh.SSHClientChannel[bytes]) -> None:
    try:
        msg = json.loads(message)
    except ValueError:
        return
    if not isinstance(msg, dict) or msg.get("type") != "resize":
        return  # unknown control messages are ignored so newer pages work with older gateways
    cols, rows = msg.get("cols"), msg.get("rows")
    if isinstance(cols, int) and isinstance(rows, int) and 2 <= cols <= 1000 and 2 <= rows <= 1000:
        chan.change_terminal_size(cols, rows)


async def tunnel(gw: Gateway, ws: ServerConnection, grant: Grant) -> None:
    """SSH over WebSocket: binary frames to and from the gateway's own SSH listener on loopback."""
    host = LOOPBACK.get(gw.settings.ssh_host, gw.settings.ssh_host)
    # The SSH listener sees loopback; tell it the real client so limits and logs name the right one. The
    # local address is bound and registered before connecting: the listener looks it up on accept.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    local: tuple[str, int] | None = None
    try:
        sock.bind((host, 0))
        bound = sock.getsockname()
        local = (str(bound[0]), int(bound[1]))
        gw.tunnel_sources[local] = grant.source
        await asyncio.get_running_loop().sock_connect(sock, (host, gw.port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError as exc:
        sock.close()
        if local is not None:
            gw.tunnel_sources.pop(local, None)
        log.warning("web %s: ssh tunnel cannot reach %s:%d: %r", grant.id, host, gw.port, exc)
        await refuse(ws, "Orzbob Cloud is unavailable right now; try again shortly")
        return
    log.info("web %s from %s: ssh tunnel for %s", grant.id, grant.source, grant.session_id)
    try:
        await _first_done(_tcp_to_ws(reader, ws), _ws_to_tcp(ws, writer))
    finally:
        gw.tunnel_sources.pop(local, None)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        with contextlib.suppress(ConnectionClosed):
            await ws.close(1000, "ssh connection closed")


async def _tcp_to_ws(reader: asyncio.StreamReader, ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while data := await reader.read(READ_CHUNK):
            await ws.send(data)


async def _ws_to_tcp(ws: ServerConnection, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionClosed, ConnectionError):
        async for message in ws:
            if isinstance(message, str):
                return  # SSH is bytes only: a text frame is a confused client
            writer.write(message)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def _first_done(*coros: Awaitable[None]) -> None:
    """Run both directions; when one ends (a side closed), stop the other."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def wants_control(ws: ServerConnection) -> bool:
    """Whether this client reads JSON control messages (it asked for CONTROL_PROTOCOL)."""
    return ws.subprotocol == CONTROL_PROTOCOL


def select_subprotocol(_ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Agree to CONTROL_PROTOCOL when offered; a client that offers none is served raw bytes only."""
    return Subprotocol(CONTROL_PROTOCOL) if CONTROL_PROTOCOL in offered else None


async def _send_line(ws: ServerConnection, line: str) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(f"{line}\r\n".encode())


async def _send_raw(ws: ServerConnection, data: bytes) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(data)


async def _send_json(ws: ServerConnection, payload: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps(payload))


async def refuse(ws: ServerConnection, line: str, *, control: bool = False) -> None:
    """The one-line reason, as a control message (when the client reads them), in the terminal, and as
    the close reason."""
    with contextlib.suppress(ConnectionClosed):
        if control:
            await _send_json(ws, {"type": "error", "message": line})
        await ws.send(f"orz: {line}\r\n".encode())
        await ws.close(CLOSE_REFUSED, line[:100])
