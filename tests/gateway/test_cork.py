"""CorkTransport: writes of one loop turn leave as one socket write, in order, bytes unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.cork import CorkTransport


class _Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_writes_of_one_turn_are_joined() -> None:
    inner = _Recorder()
    cork = CorkTransport(inner, asyncio.get_running_loop())
    cork.write(b"ignore-packet")
    cork.write(b"data-packet")
    assert inner.writes == []
    await asyncio.sleep(0)
    assert inner.writes == [b"ignore-packetdata-packet"]
    cork.write(b"next")
    cork.close()  # close flushes first
    assert inner.writes[-1] == b"next" and inner.closed
