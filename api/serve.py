"""Serve the Sanic app inside an existing event loop, so `orz server` can run it beside the gateway."""

from __future__ import annotations

import asyncio
import socket

from sanic import Sanic
from sanic.server.async_server import AsyncioServer

from api import metrics


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 is any free port (Sanic itself reads 0 as "use 8000")."""
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                reuse_port=False, backlog=1024)


class ApiServer:
    """A started API listener; ``port`` is the real one when 0 was asked for."""

    def __init__(self, app: Sanic, server: AsyncioServer) -> None:
        self.app = app
        self._server = server
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        sock: socket.socket = self._server.server.sockets[0]  # type: ignore[union-attr]
        return int(sock.getsockname()[1])

    @classmethod
    async def start(cls, app: Sanic, host: str, port: int, *, sock: socket.socket | None = None) -> ApiServer:
        """Listen on host:port, or on ``sock``, a listening socket shared with other workers (`orz api --workers`)."""
        if sock is None:
            sock = listen(host, port)
        sock.setblocking(False)
        server = await app.create_server(sock=sock, return_asyncio_server=True, access_log=False)
        assert server is not None
        await server.startup()
        await server.before_start()
        await server.after_start()
        metrics.count_tasks(asyncio.get_running_loop())
        return cls(app, server)

    async def stop(self) -> None:
        await self._server.before_stop()
        self._server.close()
        await self._server.wait_closed()
        await self._server.after_stop()
