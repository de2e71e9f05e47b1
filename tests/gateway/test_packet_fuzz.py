"""Bounded fuzzing of the gateway's packet handling: crafted packets into a real gateway's receive path.

Each example opens a real asyncssh client connection through the gateway to the runner stand-in (a `cat`
session, so its channel is spliced onto the fast path), then feeds the gateway connection packets sealed
with the gateway's own keys (tests/gateway/packets.py): lying lengths, short or oversized padding, bad tags,
zero-length packets, unknown channel ids, other message types, data beyond the channel's window, cut at
arbitrary points as TCP may. After every example: no exception escaped (asyncio's handler, asyncssh's
"Uncaught exception"), nothing was logged at ERROR, and a bystander connection still echoes.
The gateway runs on its own event loop thread so hypothesis can drive it from a plain test function.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_EXTENDED_DATA,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_IGNORE,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import splice
from tests.gateway.conftest import Env, asyncssh_client, gateway_env
from tests.gateway.packets import BLOCK, Sealer, channel_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class _Records(logging.Handler):
    """ERROR records from anywhere, and exceptions escaping the gateway's own code into asyncssh.

    asyncssh's own refusal of a malformed packet (e.g. PacketDecodeError for an empty payload) closes
    that connection with a DEBUG note: that is the behaviour wanted, so only tracebacks through
    gateway/ count.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        trace = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        ours = f"{os.sep}gateway{os.sep}" in trace
        if record.levelno >= logging.ERROR or ("Uncaught exception" in message and ours):
            self.bad.append(f"{record.name}: {message} {trace}")


@dataclass(repr=False)
class Harness:
    loop: asyncio.AbstractEventLoop
    env: Env
    bystander: Any  # an asyncssh process on a connection no example touches
    records: _Records
    unhandled: list[str] = field(default_factory=list)

    def run(self, coro: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-gateway", daemon=True)
    thread.start()
    records = _Records()
    root, ssh_log = logging.getLogger(), logging.getLogger("asyncssh")
    old_level = ssh_log.level
    root.addHandler(records)
    ssh_log.setLevel(logging.DEBUG)
    stack: list[Any] = []
    unhandled: list[str] = []
    loop.call_soon_threadsafe(loop.set_exception_handler,
                              lambda _l, ctx: unhandled.append(str(ctx.get("exception") or ctx.get("message"))))

    async def start() -> Harness:
        cm = gateway_env(tmp_path_factory.mktemp("fuzz"), gateway_access_check_s=60)
        env = await cm.__aenter__()
        stack.append(cm)
        conn = await asyncssh_client(env, keepalive_interval=0)
        stack.append(conn)
        bystander = await conn.create_process("cat", encoding=None)
        return Harness(loop, env, bystander, records, unhandled)

    made = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    try:
        yield made
    finally:
        async def stop() -> None:
            conn = stack.pop()
            conn.close()
            await conn.wait_closed()
            await stack.pop().__aexit__(None, None, None)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        root.removeHandler(records)
        ssh_log.setLevel(old_level)


# -- what a hostile client may send --------------------------------------------------------------------

KINDS = ("data", "data_size_lie", "message", "bad_padding", "length_lie", "zero_length", "bad_tag", "huge_length",
         "overrun")
CHANNEL = st.one_of(st.just("spliced"), st.integers(0, 2**32 - 1))
PAYLOAD = st.binary(max_size=300)


@st.composite
def packets(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(KINDS))
    return kind, {
        "channel": draw(CHANNEL),
        "data": draw(PAYLOAD),
        "size": draw(st.integers(0, 2**32 - 1)),
        "msg": draw(st.sampled_from([MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA, MSG_CHANNEL_WINDOW_ADJUST,
                                     MSG_CHANNEL_EOF, MSG_CHANNEL_CLOSE, MSG_CHANNEL_REQUEST, MSG_IGNORE, 0, 255])),
        "padlen": draw(st.one_of(st.integers(0, 3), st.integers(200, 255))),
        "length": draw(st.integers(1, 4 * BLOCK)),
    }


_EXAMPLE: dict[str, Any] = {"channel": "spliced", "data": b"", "size": 0, "msg": MSG_CHANNEL_DATA, "padlen": 0,
                            "length": 1}


def _seal(sealer: Sealer, spliced: int, kind: str, p: dict[str, Any]) -> bytes:
    channel = spliced if p["channel"] == "spliced" else p["channel"]
    data = p["data"]
    if kind == "data":
        return sealer.payload(channel_data(channel, data))
    if kind == "data_size_lie":
        return sealer.payload(channel_data(channel, data, size=p["size"]))
    if kind == "message":
        return sealer.payload(bytes([p["msg"]]) + channel.to_bytes(4, "big") + data)
    if kind == "bad_padding":
        return sealer.payload(channel_data(channel, data), padlen=p["padlen"])
    if kind == "length_lie":  # sealed over a body of one length, declaring another
        body = bytes([4]) + channel_data(channel, data) + bytes(4)
        return sealer.seal(body[:p["length"]])
    if kind == "zero_length":
        return sealer.seal(b"", length=0)
    if kind == "bad_tag":
        sealed = bytearray(sealer.payload(channel_data(channel, data)))
        sealed[-1] ^= 0x55
        return bytes(sealed)
    if kind == "huge_length":
        return (p["size"] | 1 << 31).to_bytes(4, "big") + data
    assert kind == "overrun"  # more data than the channel's window has room for
    return sealer.payload(channel_data(channel, data + b"x" * 64))


async def _spliced_path(env: Env, conn: asyncssh.SSHClientConnection) -> splice.FastPath:
    port = conn.get_extra_info("sockname")[1]
    for _ in range(200):
        for client in list(env.gateway.connections):
            path = getattr(client.conn, "fast_path", None)
            peer = client.conn.get_extra_info("peername") if client.conn else None
            if isinstance(path, splice.FastPath) and peer and peer[1] == port and path.legs:
                return path
        await asyncio.sleep(0.01)
    raise AssertionError("the example's channel was never spliced")


async def _example(env: Env, sequence: list[tuple[str, dict[str, Any]]], cuts: list[int],
                   window_left: int | None) -> None:
    conn = await asyncssh_client(env, keepalive_interval=0)
    try:
        await conn.create_process("cat", encoding=None)
        path = await _spliced_path(env, conn)
        spliced = next(iter(path.legs))
        if window_left is not None:
            path.legs[spliced].src._recv_window = window_left  # the session has not read for a while
        sealer = Sealer(path.conn)
        stream = b"".join(_seal(sealer, spliced, kind, p) for kind, p in sequence)
        start = 0
        for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
            if path.conn.is_closed():
                break
            if cut > start:
                path.data_received(stream[start:cut])  # as the socket would deliver it
                start = cut
            await asyncio.sleep(0)
    finally:
        conn.close()
        await conn.wait_closed()


async def _bystander_echoes(h: Harness) -> bytes:
    h.bystander.stdin.write(b"still-here\n")
    return await asyncio.wait_for(h.bystander.stdout.readexactly(11), 10)  # type: ignore[no-any-return]


def _each_kind_alone(test: Any) -> Any:
    for kind in KINDS:
        packet = (kind, {**_EXAMPLE, "data": b"x" * 20, "padlen": 255, "length": 5, "size": 2**31})
        test = example(sequence=[packet], cuts=[3], window_left=10 if kind == "overrun" else None)(test)
    return test


# Always tried, besides what hypothesis draws: each kind of packet once, and the audit's case (data batched
# from one read, then a zero-length packet with a valid tag).
@example(sequence=[("data", {**_EXAMPLE, "data": b"batched"}), ("zero_length", _EXAMPLE)], cuts=[],
         window_left=None)
@_each_kind_alone
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(packets(), min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 2000), max_size=3),
       window_left=st.one_of(st.none(), st.integers(0, 200)))
def test_crafted_packets_never_escape_or_spill_over(harness: Harness, sequence: list[tuple[str, dict[str, Any]]],
                                                    cuts: list[int], window_left: int | None) -> None:
    harness.records.bad.clear()
    harness.unhandled.clear()
    harness.run(_example(harness.env, sequence, cuts, window_left))
    assert not harness.unhandled, harness.unhandled[:3]
    assert not harness.records.bad, [line[-3000:] for line in harness.records.bad[:2]]
    assert harness.run(_bystander_echoes(harness)) == b"still-here\n"


def test_the_fuzz_reached_the_fast_path_and_asyncssh(harness: Harness) -> None:
    """The examples above are not all refused at the door: some relayed data, some went to asyncssh."""
    async def probe() -> tuple[int, bool]:
        conn = await asyncssh_client(harness.env, keepalive_interval=0)
        try:
            await conn.create_process("cat", encoding=None)
            path = await _spliced_path(harness.env, conn)
            spliced = next(iter(path.legs))
            sealer = Sealer(path.conn)
            before = path.relayed_packets
            path.data_received(sealer.payload(channel_data(spliced, b"relayed"))
                               + sealer.payload(bytes([MSG_CHANNEL_WINDOW_ADJUST]) + bytes(8)))
            await asyncio.sleep(0.05)
            return path.relayed_packets - before, path.conn.is_closed()
        finally:
            conn.close()
            await conn.wait_closed()

    relayed, _ = harness.run(probe())
    assert relayed == 1
    assert not harness.records.bad and not harness.unhandled


