"""TCP forwarding through the bridge: -L/-D (direct-tcpip) into the session, -R listeners inside it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal

import asyncssh

from gateway import splice, window
from gateway.bridge import Attachment, Counters
from gateway.errors import AttachRefused, UpstreamUnavailable


class Pipe(asyncssh.SSHTCPSession[bytes]):
    """One end of a TCP relay between a client channel and a runner channel."""

    def __init__(self, counters: Counters, outbound: bool, *, fast_path: bool = True) -> None:
        self.peer: Pipe | None = None
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._pending: list[bytes] = []
        self._eof = False
        self._counters = counters
        self._outbound = outbound  # True when this end faces the client
        self._fast_path = fast_path

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan
        window.hold_window(chan)  # paused while the other end lags: hold one window, not more
        for data in self._pending:
            chan.write(data)
        self._pending.clear()
        if self._eof:
            chan.write_eof()
        peer = self.peer
        if self._fast_path and peer is not None and peer._chan is not None and not peer._pending:
            # Both ends are open and nothing waits: the pair's data can skip asyncssh's channels.
            client_chan, runner_chan = (chan, peer._chan) if self._outbound else (peer._chan, chan)
            # A Pipe writes straight to its channel, so it never holds data back (no client_idle).
            splice.splice(client_chan, runner_chan, to_upstream=self._counters.add_in,
                          to_client=self._counters.add_out)

    def send(self, data: bytes) -> None:
        if self._outbound:
            self._counters.bytes_out += len(data)
        else:
            self._counters.bytes_in += len(data)
        if self._chan is None:
            self._pending.append(data)
        else:
            self._chan.write(data)

    def send_eof(self) -> None:
        if self._chan is None:
            self._eof = True
        else:
            self._chan.write_eof()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.peer is not None:
            self.peer.send(data)

    def eof_received(self) -> bool:
        if self.peer is not None:
            self.peer.send_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer._chan is not None:
            self.peer._chan.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer._chan is not None:
            self.peer._chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            splice.unsplice(self._chan, self.peer._chan)
        if self.peer is not None and self.peer._chan is not None:
            self.peer._chan.close()


def pipe_pair(counters: Counters, *, fast_path: bool = True) -> tuple[Pipe, Pipe]:
    """(client-facing end, runner-facing end), linked to each other."""
    client_end = Pipe(counters, outbound=True, fast_path=fast_path)
    runner_end = Pipe(counters, outbound=False, fast_path=fast_path)
    client_end.peer, runner_end.peer = runner_end, client_end
    return client_end, runner_end


async def open_direct(attachment: Attachment, dest_host: str, dest_port: int,
                      orig_host: str, orig_port: int, *, fast_path: bool = True) -> Pipe:
    """ssh -L / -D / VS Code: open the same destination inside the session (the runner allows loopback)."""
    try:
        conn = await attachment.for_new_channel()
    except (AttachRefused, UpstreamUnavailable) as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"orz: {exc.line}") from exc
    client_end, runner_end = pipe_pair(attachment.counters, fast_path=fast_path)
    try:
        await conn.create_connection(lambda: runner_end, dest_host, dest_port, orig_host, orig_port)
    except asyncssh.ChannelOpenError:
        raise
    except (asyncssh.Error, OSError) as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "session unreachable") from exc
    return client_end


async def open_remote_listener(attachment: Attachment, client_conn: asyncssh.SSHServerConnection,
                               listen_host: str, listen_port: int, *,
                               fast_path: bool = True) -> asyncssh.SSHListener | Literal[False]:
    """ssh -R: ask the runner to listen in the session and relay each connection back to the client."""
    try:
        conn = await attachment.for_new_channel()
    except (AttachRefused, UpstreamUnavailable):
        return False  # the client's request fails; asyncssh handles only OSError from here
    port_box: list[int] = [listen_port]

    def accepted(orig_host: str, orig_port: int) -> Awaitable[Pipe]:
        return _relay_back(orig_host, orig_port)

    async def _relay_back(orig_host: str, orig_port: int) -> Pipe:
        client_end, runner_end = pipe_pair(attachment.counters, fast_path=fast_path)
        await client_conn.create_connection(lambda: client_end, listen_host, port_box[0],
                                            orig_host, orig_port)
        return runner_end

    listener = await conn.create_server(accepted, listen_host, listen_port)  # type: ignore[arg-type]
    port_box[0] = listener.get_port() if listen_port == 0 else listen_port
    return listener

