"""A byte relay in Python on uvloop, as the gateway runs: what one more Python process in the path costs
before any SSH work is done in it (bench/real_path.py --relay-python; socat is the same floor in C).

    python -m bench.pyrelay LISTEN_PORT TARGET_PORT [SPIN_US]

Each connection's bytes go to a connection to 127.0.0.1:TARGET_PORT and back, unchanged, written as they
arrive (TCP_NODELAY is on: asyncio and uvloop set it on TCP transports). Prints nothing; stops on SIGTERM.
SPIN_US (default 0) keeps the CPU busy that long per read before writing: a relay that costs that much more per
packet, to measure what a microsecond of a hop's CPU per read adds to the echo (bench/README.md, the C path).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

_spin_ns = 0


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: what it receives is written on `peer`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self._early: list[bytes] = []  # bytes that came before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if _spin_ns:
            clock = time.perf_counter_ns
            until = clock() + _spin_ns
            while clock() < until:
                pass
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self._early.append(data)

    def joined(self, peer: _Pipe) -> None:
        self.peer = peer
        assert peer.transport is not None
        for data in self._early:
            peer.transport.write(data)
        self._early.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(listen_port: int, target_port: int) -> None:
    loop = asyncio.get_running_loop()

    def accepted() -> _Pipe:
        down = _Pipe()

        async def connect() -> None:
            try:
                _, up = await loop.create_connection(_Pipe, "127.0.0.1", target_port)
            except OSError:
                if down.transport is not None:
                    down.transport.close()
                return
            up.joined(down)
            down.joined(up)

        loop.create_task(connect())  # noqa: RUF006 (the connection's transports keep it going)
        return down

    server = await loop.create_server(accepted, "127.0.0.1", listen_port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    import uvloop

    global _spin_ns
    _spin_ns = int(float(sys.argv[3]) * 1000) if len(sys.argv) > 3 else 0
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
