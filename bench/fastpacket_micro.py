"""A keystroke's four fast-path steps in C (bench/fastpacket/_fastpacket.c) against gateway/splice.py, hot and cold.

The C side owns its per-packet state in one struct per connection (AES-GCM contexts with their key schedule
kept, nonce counters, sequence numbers, channel windows) where splice.py reads asyncssh's instance dicts.
Each step is driven the way a protocol callback would drive it, one Python call per read:

    c_bare    the step's Python wrapper calls the extension and writes its result (nothing else)
    c_wired   as c_bare, plus what a wiring into asyncssh would keep doing per read in Python: the check that
              asyncssh is at a packet boundary and the connection is open, and the keepalive clock
    relay     no SSH at all: each step writes the bytes it got (a byte relay's floor, bench/pyrelay.py)
    py        this tree's gateway/splice.py (bench/fastpath_micro.py's chain)

All four run interleaved in one process on the same packets' shapes (one keystroke per packet), each chain
checked afterwards: every key reached the runner and came back readable by asyncssh, in order.

    make -C bench/fastpacket   # or the gcc line at the top of _fastpacket.c
    python -m bench.fastpacket_micro [--cold] [--keys 400] [--reps 9] [--only c_wired] [--size 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gateway.cork
import gateway.splice
from bench import fastpath_micro
from bench.fastpath_micro import STEPS, WINDOW, Chain, _client_packets, _open_all

HERE = Path(__file__).resolve().parent / "fastpacket"


def load_extension(where: Path = HERE) -> Any:
    """_fastpacket*.so in `where` (bench/fastpacket/), built beforehand (see the module doc)."""
    found = sorted(where.glob("_fastpacket*.so"))
    if not found:
        sys.exit(f"build the extension first: make -C {HERE}")
    spec = importlib.util.spec_from_file_location("_fastpacket", found[0])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Guard:
    """What asyncssh's connection would still be asked per read by a wiring of the C path (c_wired)."""

    def __init__(self) -> None:
        self._recv_pkthdr = self._recv_handler = self._pkthdr
        self._transport = object()

    def _pkthdr(self) -> None:
        raise AssertionError("compared, never called")


class CChain:
    """The gateway's two connections and the runner's one as C Conns, with the keys of a Python Chain's layout."""

    def __init__(self, fp: Any, gw_loop: asyncio.AbstractEventLoop, wired: bool,
                 keys: dict[str, bytes] | None = None) -> None:
        self.keys = keys or {k: os.urandom(16) for k in ("client_up", "client_down", "runner_up", "runner_down")}
        k = self.keys
        maxlen = 35000 + 4096
        self.client = fp.Conn(k["client_up"], k["client_up"][:12], k["client_down"], k["client_down"][:12], maxlen)
        self.upstream = fp.Conn(k["runner_down"], k["runner_down"][:12], k["runner_up"], k["runner_up"][:12], maxlen)
        self.endpoint = fp.Conn(k["runner_up"], k["runner_up"][:12], k["runner_down"], k["runner_down"][:12], maxlen)
        # recv_chan, send_chan, recv window, initial recv window, send window, send packet size, linked channel
        self.client.add_channel(0, 7, WINDOW, WINDOW, WINDOW, fastpath_micro.PKTSIZE, 0)
        self.upstream.add_channel(1, 0, WINDOW, WINDOW, WINDOW, fastpath_micro.PKTSIZE, 0)
        self.endpoint.add_channel(0, 1, WINDOW, WINDOW, WINDOW, fastpath_micro.PKTSIZE)
        to_client, to_runner = fastpath_micro._Transport(), fastpath_micro._Transport()
        self.to_client, self.to_runner = to_client.out, to_runner.out
        cork_client = gateway.cork.CorkTransport(to_client, gw_loop)  # type: ignore[arg-type]
        cork_runner = gateway.cork.CorkTransport(to_runner, gw_loop)  # type: ignore[arg-type]
        self.keys_seen: list[bytes] = []
        self.from_runner: list[bytes] = []
        self.handed_over = 0
        self.gw_in = self._relay(self.client, self.upstream, cork_runner.write_now, wired)
        self.gw_out = self._relay(self.upstream, self.client, cork_client.write_now, wired)
        self.run_in = self._relay(self.endpoint, None, self.keys_seen.append, wired)
        send, write = self.endpoint.send, self.from_runner.append

        def run_out(data: bytes) -> None:
            sealed = send(0, data)
            if sealed is None:
                self.handed_over += 1
            else:
                write(sealed)

        self.run_out = run_out

    def _relay(self, conn: Any, out: Any, write: Callable[[bytes], None], wired: bool) -> Callable[[bytes], None]:
        receive = conn.receive
        guard = _Guard()
        monotonic = time.monotonic
        state = [0.0]

        def step(data: bytes) -> None:
            produced = receive(data, out)
            if produced:
                write(produced)
            if conn.consumed != len(data):
                self.handed_over += 1

        def wired_step(data: bytes) -> None:
            if guard._recv_handler != guard._recv_pkthdr or guard._transport is None:
                self.handed_over += 1
                return
            now = monotonic()
            if now - state[0] >= 1.0:
                state[0] = now
            produced = receive(data, out)
            if produced:
                write(produced)
            if conn.consumed != len(data):
                self.handed_over += 1

        return wired_step if wired else step

    def steps(self) -> tuple[tuple[Callable[[bytes], None], list[bytes]], ...]:
        return ((self.gw_in, self.to_runner), (self.run_in, self.keys_seen), (self.run_out, self.from_runner),
                (self.gw_out, self.to_client))

    def outputs(self) -> tuple[list[bytes], ...]:
        return self.to_runner, self.keys_seen, self.from_runner, self.to_client

    def check(self, packets: list[bytes], echoes: list[bytes]) -> None:
        assert len(self.to_client) == len(packets), (len(self.to_client), len(packets))
        assert self.handed_over == 0, "a packet left the C path"
        assert b"".join(self.keys_seen) == b"".join(echoes)


class RelayChain:
    """The floor: each step passes the bytes on (a Python byte relay's work per read, no SSH)."""

    def __init__(self) -> None:
        self.keys = {k: os.urandom(16) for k in ("client_up", "client_down", "runner_up", "runner_down")}
        self.to_runner: list[bytes] = []
        self.keys_seen: list[bytes] = []
        self.from_runner: list[bytes] = []
        self.to_client: list[bytes] = []

    def steps(self) -> tuple[tuple[Callable[[bytes], None], list[bytes]], ...]:
        def relay(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
            def step(data: bytes) -> None:
                write(data)
            return step
        return tuple((relay(out.append), out) for out in self.outputs())

    def outputs(self) -> tuple[list[bytes], ...]:
        return self.to_runner, self.keys_seen, self.from_runner, self.to_client

    def check(self, packets: list[bytes], echoes: list[bytes]) -> None:
        assert self.to_client == packets


class PyChain:
    """bench/fastpath_micro.py's chain (gateway/splice.py) behind the same interface."""

    def __init__(self, gw_loop: asyncio.AbstractEventLoop, run_loop: asyncio.AbstractEventLoop) -> None:
        self.chain = Chain(gateway.splice, gateway.cork, gw_loop, run_loop)
        self.keys = self.chain.keys

    def steps(self) -> tuple[tuple[Callable[[bytes], None], list[bytes]], ...]:
        c = self.chain
        run_fast, run_chan = c.run_fast, c.run_chan
        assert run_fast is not None

        def run_out(data: bytes) -> None:
            run_fast.send_data(run_chan, data)

        return ((c.client.fast_path.data_received, c.to_runner), (c.endpoint.fast_path.data_received, c.keys_seen),
                (run_out, c.from_runner), (c.upstream.fast_path.data_received, c.to_client))

    def outputs(self) -> tuple[list[bytes], ...]:
        c = self.chain
        return c.to_runner, c.keys_seen, c.from_runner, c.to_client

    def check(self, packets: list[bytes], echoes: list[bytes]) -> None:
        self.chain.check(packets, echoes)


def run(chain: Any, packets: list[bytes], evict: bytearray | None, toggle: Callable[[], None] = lambda: None
        ) -> dict[str, float]:
    """ns per packet per step; with `evict`, the caches written over before each step of each keystroke.
    `toggle` is called around each timed loop (callgrind's collection, with --callgrind)."""
    for out in chain.outputs():
        out.clear()
    timing = dict.fromkeys(STEPS, 0.0)
    clock = time.perf_counter_ns
    steps = chain.steps()
    gc.collect()
    gc.disable()
    try:
        if evict is None:  # hot: each step over all packets in a loop
            item_lists: list[list[bytes]] = [packets]
            for name, (step, out) in zip(STEPS, steps, strict=True):
                items = list(item_lists[-1])
                toggle()
                t0 = clock()
                for item in items:
                    step(item)
                timing[name] = clock() - t0
                toggle()
                item_lists.append(out)
        else:
            for pkt in packets:
                item = pkt
                for name, (step, out) in zip(STEPS, steps, strict=True):
                    evict[::64] = bytes(len(evict[::64]))  # one write per cache line
                    t0 = clock()
                    step(item)
                    timing[name] += clock() - t0
                    item = out[-1]
    finally:
        gc.enable()
    return {name: ns / len(packets) for name, ns in timing.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=5000, help="keystrokes per repetition")
    parser.add_argument("--reps", type=int, default=21, help="repetitions, the sides alternating; each step's fastest")
    parser.add_argument("--cold", action="store_true", help="evict the CPU caches (32 MiB) before each step")
    parser.add_argument("--size", type=int, default=1, help="bytes per packet")
    parser.add_argument("--only", default="relay,c_bare,c_wired,py", help="sides to run, comma-separated")
    parser.add_argument("--callgrind", action="store_true",
                        help="count only the timed steps under valgrind --tool=callgrind --collect-atstart=no")
    args = parser.parse_args()
    fp = load_extension()
    try:
        import uvloop
        gw_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        gw_loop = asyncio.new_event_loop()
    run_loop = asyncio.new_event_loop()
    makers: dict[str, Callable[[], Any]] = {
        "relay": RelayChain,
        "c_bare": lambda: CChain(fp, gw_loop, wired=False),
        "c_wired": lambda: CChain(fp, gw_loop, wired=True),
        "py": lambda: PyChain(gw_loop, run_loop),
    }
    sides = [s for s in args.only.split(",") if s]
    evict = bytearray(32 << 20) if args.cold else None
    results: dict[str, dict[str, list[float]]] = {s: {step: [] for step in STEPS} for s in sides}
    for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
        for side in sides:
            chain = makers[side]()
            packets = _client_packets(chain.keys["client_up"], 0, args.keys, args.size)
            timing = run(chain, packets, evict, fp.toggle_collect if args.callgrind else lambda: None)
            echoes = _open_all(chain.keys["client_down"], chain.to_client if side != "py" else chain.chain.to_client) \
                if side != "relay" else []
            chain.check(packets, echoes)
            if rep:
                for step, ns in timing.items():
                    results[side][step].append(ns)
    print(f"µs per {args.size}-byte packet per step, {'cold' if args.cold else 'hot'}, fastest of {args.reps} x "
          f"{args.keys} (load average {os.getloadavg()[0]:.2f})")
    print(f"{'step':8}" + "".join(f"{s:>10}" for s in sides))
    totals = dict.fromkeys(sides, 0.0)
    for step in STEPS:
        row = []
        for side in sides:
            best = min(results[side][step]) / 1000
            totals[side] += best
            row.append(best)
        print(f"{step:8}" + "".join(f"{v:10.2f}" for v in row))
    print(f"{'total':8}" + "".join(f"{totals[s]:10.2f}" for s in sides))
    if "py" in sides:
        print(f"{'/ py':8}" + "".join(f"{totals[s] / totals['py']:10.2f}" for s in sides))


if __name__ == "__main__":
    main()
