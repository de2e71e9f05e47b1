"""ssh -A through the gateway: the runner's agent requests reach a per-connection unix socket here,
which relays them to the client's own forwarded agent, if and only if the client asked for one."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

# asyncssh creates the client's agent listener in a task after the request: give it a moment.
WAIT_FOR_CLIENT_AGENT_S = 1.0
POLL_S = 0.02


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class AgentRelay:
    """A unix socket (mode 0600, in the gateway's private runtime dir) for one client connection.

    The runner's side is told the path when the gateway connects to it, but the socket listens only from
    the first session channel whose client forwarded its agent (`start`): an idle attach without ssh -A
    holds no listener, file descriptor or socket file (10,000 held sessions: 10,000 fewer of each).
    Until then a runner-side agent request is refused, as it is for a client that never asked."""

    __slots__ = ("_client_agent_path", "_closed", "_server", "_starting", "path")  # one per client connection

    def __init__(self, path: str, client_agent_path: Callable[[], str | None]) -> None:
        self.path = path
        self._client_agent_path = client_agent_path
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Future[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Listen, once (channels of one connection may ask at the same time)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._listen())
        await asyncio.shield(self._starting)

    async def _listen(self) -> None:
        if self._closed:
            return
        server = await asyncio.start_unix_server(self._handle, path=self.path)
        os.chmod(self.path, 0o600)
        self._server = server
        if self._closed:  # the connection went while the socket was being made
            self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self._client_agent_path()
        waited = 0.0
        while target is None and waited < WAIT_FOR_CLIENT_AGENT_S:
            await asyncio.sleep(POLL_S)
            waited += POLL_S
            target = self._client_agent_path()
        if target is None:  # the client did not ask for agent forwarding
            writer.close()
            return
        try:
            agent_reader, agent_writer = await asyncio.open_unix_connection(target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, agent_writer), _pipe(agent_reader, writer))

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
