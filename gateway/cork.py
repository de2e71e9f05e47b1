"""Fewer packets and fewer socket sends per keystroke on the gateway's two SSH hops.

`WithoutFiller` connections leave out the empty IGNORE packet asyncssh sends before every encrypted
packet (api.ssh_transport.WithoutFiller: AES-GCM only, where it protects nothing), and send channel data that
asyncssh queued through the fast path's sealing (gateway.splice). The transport below batches what a
connection writes in one loop turn into one send, without changing any bytes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_NEWKEYS
from asyncssh.packet import SSHPacket

from api import ssh_transport
from api.schemas import UNIX_ROUTE_PREFIX
from gateway import idle
from gateway.keepalive import OnOneTimer
from gateway.splice import FastPath


class WithoutFiller(ssh_transport.WithoutFiller):
    """The gateway's connections: no IGNORE filler (api.ssh_transport), and channel data through the fast path."""

    fast_path: FastPath | None = None  # set by CorkProtocol: relays spliced channels' data (gateway.splice)

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        # Channel data asyncssh queued (a full window, a paused channel) leaves sealed by the fast path's
        # kept AES-GCM context, without asyncssh's per-packet copies and context set-up.
        if pkttype == MSG_CHANNEL_DATA and self.fast_path is not None and self.fast_path.send_channel_data(args):
            return
        super().send_packet(pkttype, *args, handler=handler)

    def send_newkeys(self, k: bytes, h: bytes) -> None:
        kexinits = idle.before_key_exchange_ends(self)
        super().send_newkeys(k, h)  # type: ignore[misc]
        idle.after_key_exchange(self, kexinits)  # the KEXINITs asyncssh keeps until the next key exchange

    def process_packet(self, pkttype: int, pktid: int, packet: SSHPacket) -> Any:
        result = super().process_packet(pkttype, pktid, packet)  # type: ignore[misc]
        if pkttype == MSG_NEWKEYS:
            idle.after_new_keys(self)  # what the key exchange wrote again alike for every connection
        return result


class RunnerSideConnection(OnOneTimer, WithoutFiller, asyncssh.SSHClientConnection):
    """The runner side: the gateway's SSH client connection to a session's runner (the upstream)."""

    shares_constants = True  # gateway.idle.share_constants


class TurnBatcher:
    """Writes made in one event-loop turn leave as one write: the first at once (a lone keystroke echo waits
    for nothing), the rest of the turn joined when it ends (bulk: fewer, fuller sends and packets).

    The one batching method of the gateway: under its socket writes (CorkTransport) and under its writes
    to a client's channel (gateway.bridge). Measured: without it, bulk through the gateway drops to about half.
    """

    __slots__ = ("_loop", "_parts", "_turn_open", "_write")

    def __init__(self, write: Callable[[bytes], None], loop: asyncio.AbstractEventLoop) -> None:
        self._write = write
        self._loop = loop
        self._parts: list[bytes] = []
        self._turn_open = False

    def add(self, data: bytes | bytearray | memoryview) -> None:
        if not self._turn_open:
            self._turn_open = True
            self._loop.call_soon(self.flush)
            self._write(data)  # type: ignore[arg-type]
        else:
            self._parts.append(bytes(data))

    def write_now(self, data: bytes) -> None:
        """Write without opening a turn (for a caller that batches itself); never ahead of batched bytes."""
        if self._parts:
            self._parts.append(data)
        else:
            self._write(data)

    def idle(self) -> bool:
        """Nothing batched: a write now cannot overtake an earlier one."""
        return not self._parts

    def pending(self) -> int:
        return sum(len(p) for p in self._parts)

    def discard(self) -> None:
        self._parts.clear()

    def flush(self) -> None:
        """Send what the turn batched; the next write starts a new turn."""
        self._turn_open = False
        if self._parts:
            data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts.clear()
            self._write(data)


class CorkTransport(asyncio.Transport):
    """Wraps a stream transport, its writes batched per loop turn (TurnBatcher)."""

    # Slotted like asyncio's transports (one per connection: no instance dict). write, write_now and flush
    # are the batcher's own bound methods, set per instance.
    __slots__ = ("_batch", "_t", "flush", "write", "write_now")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._t = transport
        self._batch = TurnBatcher(self._send, loop)
        # Bound once: asyncssh writes every packet through these (no extra call per packet).
        self.write = self._batch.add  # type: ignore[method-assign]
        self.write_now = self._batch.write_now
        self.flush = self._batch.flush

    def _send(self, data: bytes) -> None:
        if not self._t.is_closing():
            self._t.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def abort(self) -> None:
        self._batch.discard()
        self._t.abort()

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._t.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._t.pause_reading()

    def resume_reading(self) -> None:
        self._t.resume_reading()

    def is_reading(self) -> bool:
        return self._t.is_reading()

    def can_write_eof(self) -> bool:
        return self._t.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._t.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size() + self._batch.pending()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._t.set_write_buffer_limits(high, low)


class CorkProtocol(asyncio.Protocol):
    """Sits between asyncio and an asyncssh connection, handing it a CorkTransport; received bytes go
    through the connection's FastPath, which passes asyncssh whatever it does not relay itself."""

    __slots__ = ("_fast", "inner")  # slotted like asyncio's protocols: one per connection

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self._fast: FastPath | None = None
        idle.lean_close_event(inner)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self.inner, WithoutFiller):
            self._fast = self.inner.fast_path = FastPath(self.inner, loop)
        self.inner.connection_made(CorkTransport(transport, loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._fast is not None:
            self._fast.data_received(data)
        else:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fast is not None:
            self._fast.close()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def open_session_socket(path: str) -> int:
    """An O_PATH fd of the runner's socket at ``path``, itself and not a link in its place.

    The socket lies in the session's state dir, which the session's uid owns: it may put a symlink there to
    another session's socket, which this process (root) could reach. The pinned host key refuses that runner
    anyway; connecting through this fd keeps the gateway from knocking on any socket but the one at the path.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ENOTSOCK, "the session's endpoint is not a socket", path)
    return fd


class CorkedTunnel:
    """An asyncssh `tunnel=` connector: plain TCP to the runner, through a CorkTransport."""

    async def create_connection(self, session_factory: Any, host: str, port: int) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        conn = session_factory()
        # asyncssh.connect has no hook for the connection class; the subclass adds send_packet and fast_path.
        conn.__class__ = RunnerSideConnection
        if host.startswith(UNIX_ROUTE_PREFIX):  # a sandboxed local runner: its socket, not TCP
            fd = open_session_socket(host[len(UNIX_ROUTE_PREFIX):])
            try:
                transport, _ = await loop.create_unix_connection(lambda: CorkProtocol(conn), f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        else:
            transport, _ = await loop.create_connection(lambda: CorkProtocol(conn), host, port)
        return transport, conn

    def close(self) -> None:
        """Nothing to close: the tunnel is only a connector (asyncssh may call this)."""
