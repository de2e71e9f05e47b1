"""Join the SSH packets a connection writes in one event-loop turn into one socket send.

asyncssh sends an SSH_MSG_IGNORE packet before every encrypted packet, each as its own socket write:
two send() system calls per keystroke echo on every hop. Measured through the gateway on loopback,
that doubled the syscalls and added tens of microseconds per hop. The transport below batches writes
and sends them when the current loop turn ends (one send per turn), without changing any bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CorkTransport(asyncio.Transport):
    """Wraps a stream transport; writes made in one loop turn go out as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._t = transport
        self._loop = loop
        self._parts: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._parts.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        self._scheduled = False
        if self._parts and not self._t.is_closing():
            data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts.clear()
            self._t.write(data)
        self._parts.clear()

    def close(self) -> None:
        self.flush()
        self._t.close()

    def abort(self) -> None:
        self._parts.clear()
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
        return self._t.get_write_buffer_size() + sum(len(p) for p in self._parts)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._t.set_write_buffer_limits(high, low)


class CorkProtocol(asyncio.Protocol):
    """Sits between asyncio and an asyncssh connection, handing it a CorkTransport."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self.inner.connection_made(CorkTransport(transport, loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class CorkedTunnel:
    """An asyncssh `tunnel=` connector: plain TCP to the runner, through a CorkTransport."""

    async def create_connection(self, session_factory: Any, host: str, port: int) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        conn = session_factory()
        transport, _ = await loop.create_connection(lambda: CorkProtocol(conn), host, port)
        return transport, conn

    def close(self) -> None:
        """Nothing to close: the tunnel is only a connector (asyncssh may call this)."""
