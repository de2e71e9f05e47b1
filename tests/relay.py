"""A TCP relay to an upstream address, served from an event loop on its own thread, for tests that must
stand between a client and a server (cut the link, answer in the server's place)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self
from urllib.parse import urlsplit


class ThreadedRelay:
    """Listens on 127.0.0.1:``port`` once entered; each connection is piped to ``upstream`` (a URL)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.loop = asyncio.new_event_loop()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes = b"") -> None:
        """Pipe this connection both ways to the upstream, ``head`` (already read from it) first."""
        # Cancelled by close_all(), it ends quietly: asyncio logs a connection callback's task that ends cancelled.
        with contextlib.suppress(asyncio.CancelledError):
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self.opened(writer, up_writer)
            up_writer.write(head)
            await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))

    def opened(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        """Called for each relayed connection (a subclass keeps them to drop)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.relay(reader, writer)

    async def close_all(self) -> None:
        """Stop listening and end every connection."""
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Self:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.serve, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.close_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
