"""The fast path's CPU per keystroke, in one process: gateway/splice.py driven with real AES-GCM on stub
connections, no sockets, no event loop turns.

One keystroke echo crosses four fast-path steps, each fed the bytes the step before it wrote:

    gw_in     the gateway opens the client's CHANNEL_DATA and seals it for the runner (FastPath._relay)
    run_in    the runner's endpoint opens it and hands the key to the pty bridge (deliver_locally's sink)
    run_out   the runner seals the echo the pty gave back (FastPath.send_data)
    gw_out    the gateway opens the runner's echo and seals it for the client

Everything around them (the socket reads and writes, the event loop, the pty) is left out: this prices the
Python of each step, which machine load cannot skew much when both sides of an A/B run interleaved in one
process. `--against DIR` loads DIR/gateway/splice.py and DIR/gateway/cork.py as a second implementation
(main, checked out with `git archive main | tar -x -C DIR`) and alternates the two; `--profile` prints
cProfile's view of this tree's steps.

    python -m bench.fastpath_micro [--keys 20000] [--reps 7] [--against DIR] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import os
import pstats
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.encryption import GCMEncryption

import gateway.cork
import gateway.splice

CIPHER = "aes128-gcm"  # asyncssh's cipher-module name for aes128-gcm@openssh.com
STEPS = ("gw_in", "run_in", "run_out", "gw_out")
WINDOW = 1 << 30  # (bulk runs: a stand-in channel gets no window adjust from a peer)
PKTSIZE = 32768


class _Transport:
    """What an asyncio transport gives asyncssh and the fast path: writes, kept in order to feed the next step."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.write = self.out.append

    def is_closing(self) -> bool:
        return False


class _Conn:
    """The asyncssh connection state gateway/splice.py reads and keeps up to date (an instance dict, as asyncssh's)."""

    def __init__(self, recv_key: bytes, send_key: bytes, transport: Any) -> None:
        self._inpbuf = b""
        self._recv_pkthdr = self._recv_handler = self._pkthdr
        self._recv_encryption = GCMEncryption.new(CIPHER, recv_key, recv_key[:12])
        self._recv_seq = 3
        self._recv_macsize = 16
        self._max_recv_pktlen = 35000 + 4096
        self._decompressor = None
        self._channels: dict[int, Any] = {}
        self._transport = transport
        self._send_encryption = GCMEncryption.new(CIPHER, send_key, send_key[:12])
        self._send_seq = 3
        self._send_blocksize = 16
        self._send_enchdrlen = 1  # (asyncssh: the padding-length byte only, with GCM)
        self._compressor = None
        self._kex_complete = self._auth_complete = True
        self._rekey_bytes, self._rekey_bytes_sent = 1 << 40, 0
        self._rekey_seconds, self._rekey_time = 3600.0, time.monotonic() + 3600.0
        self.fast_path: Any = None
        self.handed_over = 0  # packets the fast path left to asyncssh (none expected)

    def _pkthdr(self) -> None:
        raise AssertionError("not called: the fast path compares it, never calls it")

    def data_received(self, data: bytes) -> None:
        self.handed_over += 1

    def _reset_keepalive_timer(self) -> None:
        pass

    def internal_error(self) -> None:
        raise AssertionError("the fast path failed")

    def get_extra_info(self, name: str) -> Any:
        return CIPHER


class _Chan:
    """The asyncssh channel state the fast path reads: an open session channel, nothing queued."""

    def __init__(self, conn: _Conn, number: int, peer: int) -> None:
        self._conn = conn
        self._recv_chan, self._send_chan = number, peer
        self._recv_state = self._send_state = "open"
        self._recv_paused = False
        self._recv_buf: list[Any] = []
        self._recv_window = self._init_recv_window = WINDOW
        self._send_buf: list[Any] = []
        self._send_window = WINDOW
        self._send_pktsize = PKTSIZE
        self._session = None
        conn._channels[number] = self

    def get_connection(self) -> _Conn:
        return self._conn

    def send_packet(self, pkttype: int, *args: bytes) -> None:
        self._send_window = WINDOW  # the window adjust the peer would send back


def _client_packets(key: bytes, chan: int, n: int, size: int = 1) -> list[bytes]:
    """`n` sealed CHANNEL_DATA packets of `size` bytes each from an OpenSSH-like client (asyncssh's sealing)."""
    enc = GCMEncryption.new(CIPHER, key, key[:12])
    out = []
    for i in range(n):
        payload = (bytes([MSG_CHANNEL_DATA]) + chan.to_bytes(4, "big") + size.to_bytes(4, "big")
                   + bytes([97 + i % 26]) * size)
        padlen = -(1 + len(payload)) % 16
        padlen += 16 if padlen < 4 else 0
        packet = bytes([padlen]) + payload + os.urandom(padlen)
        header = len(packet).to_bytes(4, "big")
        sealed, tag = enc.encrypt_packet(0, header, packet)
        out.append(sealed + tag)
    return out


def _open_all(key: bytes, packets: list[bytes]) -> list[bytes]:
    """What the client would read: each packet's channel data (the check that the chain carried the echo)."""
    enc = GCMEncryption.new(CIPHER, key, key[:12])
    out = []
    for pkt in packets:
        plain = enc.decrypt_packet(0, pkt[:4], pkt[4:-16], 4, pkt[-16:])
        assert plain is not None and plain[1] == MSG_CHANNEL_DATA, "the client could not open the echo"
        out.append(plain[10:len(plain) - plain[0]])
    return out


def load_tree(tree: Path) -> tuple[ModuleType, ModuleType]:
    """Another checkout's splice.py and cork.py as modules of their own (its cork uses its own splice)."""
    mods = []
    for name in ("splice", "cork"):
        spec = importlib.util.spec_from_file_location(f"_micro_{tree.name}_{name}", tree / "gateway" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        if name == "cork":
            saved = sys.modules["gateway.splice"]
            sys.modules["gateway.splice"] = mods[0]
            try:
                spec.loader.exec_module(mod)
            finally:
                sys.modules["gateway.splice"] = saved
        else:
            spec.loader.exec_module(mod)
        mods.append(mod)
    return mods[0], mods[1]


class Chain:
    """One implementation's gateway (two connections, corked, uvloop's clock) and runner endpoint (one
    connection, asyncio's transport), spliced as a session attach leaves them."""

    def __init__(self, splice: ModuleType, cork: ModuleType, gw_loop: asyncio.AbstractEventLoop,
                 run_loop: asyncio.AbstractEventLoop) -> None:
        self.splice = splice
        self.keys = {k: os.urandom(16) for k in ("client_up", "client_down", "runner_up", "runner_down")}
        to_client, to_runner = _Transport(), _Transport()
        self.to_client, self.to_runner = to_client.out, to_runner.out
        self.client = _Conn(self.keys["client_up"], self.keys["client_down"],
                            cork.CorkTransport(to_client, gw_loop))  # type: ignore[arg-type]
        self.upstream = _Conn(self.keys["runner_down"], self.keys["runner_up"],
                              cork.CorkTransport(to_runner, gw_loop))  # type: ignore[arg-type]
        endpoint_out = _Transport()
        self.from_runner = endpoint_out.out
        self.endpoint = _Conn(self.keys["runner_up"], self.keys["runner_down"], endpoint_out)
        for conn, loop in ((self.client, gw_loop), (self.upstream, gw_loop), (self.endpoint, run_loop)):
            conn.fast_path = splice.FastPath(conn, loop)
        client_chan, up_chan = _Chan(self.client, 0, 7), _Chan(self.upstream, 1, 0)
        assert splice.splice(client_chan, up_chan, to_upstream=_count, to_client=_count, client_idle=_always)
        self.run_chan = _Chan(self.endpoint, 0, 1)
        self.keys_seen: list[bytes] = []  # what reached the pty (the runner's sink)
        self.run_fast = splice.deliver_locally(self.run_chan, self.keys_seen.append, _always)
        assert self.run_fast is not None

    def run(self, packets: list[bytes]) -> dict[str, float]:
        """The four steps over `packets` (one keystroke each); ns per packet per step."""
        for out in (self.to_runner, self.keys_seen, self.from_runner, self.to_client):
            out.clear()
        gc.collect()
        gc.disable()  # a collection landing in one side's steps and not the other's is noise, not cost
        try:
            return self._steps(packets)
        finally:
            gc.enable()

    def _steps(self, packets: list[bytes]) -> dict[str, float]:
        timing: dict[str, float] = {}
        clock = time.perf_counter_ns
        n = len(packets)
        receive = self.client.fast_path.data_received
        t0 = clock()
        for pkt in packets:
            receive(pkt)
        timing["gw_in"] = (clock() - t0) / n
        receive = self.endpoint.fast_path.data_received
        to_runner = list(self.to_runner)
        t0 = clock()
        for pkt in to_runner:
            receive(pkt)
        timing["run_in"] = (clock() - t0) / n
        send, chan = self.run_fast.send_data, self.run_chan
        keys = list(self.keys_seen)
        t0 = clock()
        for key in keys:
            send(chan, key)
        timing["run_out"] = (clock() - t0) / n
        receive = self.upstream.fast_path.data_received
        from_runner = list(self.from_runner)
        t0 = clock()
        for pkt in from_runner:
            receive(pkt)
        timing["gw_out"] = (clock() - t0) / n
        return timing

    def run_cold(self, packets: list[bytes], evict: bytearray) -> dict[str, float]:
        """As `run`, one keystroke at a time, each step after `evict` is written over: the caches hold none of
        the step's code or data, as in a real gateway, where other processes run between keystrokes."""
        for out in (self.to_runner, self.keys_seen, self.from_runner, self.to_client):
            out.clear()
        timing = dict.fromkeys(STEPS, 0.0)
        clock = time.perf_counter_ns
        steps = ((self.client.fast_path.data_received, self.to_runner), (self.endpoint.fast_path.data_received,
                 self.keys_seen), (None, self.from_runner), (self.upstream.fast_path.data_received, self.to_client))
        gc.disable()
        try:
            for pkt in packets:
                item = pkt
                for name, (step, out) in zip(STEPS, steps, strict=True):
                    evict[::64] = bytes(len(evict[::64]))  # one write per cache line
                    t0 = clock()
                    if step is None:
                        self.run_fast.send_data(self.run_chan, item)
                    else:
                        step(item)
                    timing[name] += clock() - t0
                    item = out[-1]
        finally:
            gc.enable()
        return {name: ns / len(packets) for name, ns in timing.items()}

    def check(self, packets: list[bytes], client_key_stream: Any) -> None:
        """Every keystroke reached the pty and came back to the client, in order, all on the fast path."""
        assert len(self.to_client) == len(packets), (len(self.to_client), len(packets))
        assert b"".join(self.keys_seen) == b"".join(client_key_stream)
        for conn in (self.client, self.upstream, self.endpoint):
            assert conn.handed_over == 0, "a packet left the fast path"


def _count(size: int) -> None:
    return None


def _always() -> bool:
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=5000, help="keystrokes per repetition")
    parser.add_argument("--reps", type=int, default=21,
                        help="repetitions, the sides alternating; each step's fastest (other jobs only add time)")
    parser.add_argument("--against", type=Path, metavar="DIR", help="another checkout to A/B against")
    parser.add_argument("--profile", action="store_true", help="cProfile this tree's steps instead")
    parser.add_argument("--size", type=int, default=1,
                        help="bytes per packet (1: a keystroke; 32768: a stream, as the client's packets in bulk)")
    parser.add_argument("--cold", action="store_true",
                        help="evict the CPU caches (32 MiB written over) before each step of each keystroke")
    args = parser.parse_args()
    try:
        import uvloop
        gw_loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        gw_loop = asyncio.new_event_loop()
    run_loop = asyncio.new_event_loop()
    impls: dict[str, tuple[ModuleType, ModuleType]] = {}
    if args.against:
        impls["against"] = load_tree(args.against)
    impls["this"] = (gateway.splice, gateway.cork)
    evict = bytearray(32 << 20)
    results: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STEPS} for name in impls}
    for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
        for name, (splice, cork) in impls.items():
            chain = Chain(splice, cork, gw_loop, run_loop)
            packets = _client_packets(chain.keys["client_up"], 0, args.keys, args.size)
            if args.profile and name == "this" and rep == args.reps:
                prof = cProfile.Profile()
                prof.enable()
                chain.run(packets)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
                continue
            timing = chain.run_cold(packets, evict) if args.cold else chain.run(packets)
            chain.check(packets, _open_all(chain.keys["client_down"], chain.to_client))
            if rep:
                for step, ns in timing.items():
                    results[name][step].append(ns)
    for name, (splice, _cork) in impls.items():  # a compiled splice (mypyc's .so, bench/README.md) shows here
        print(f"{name}: {splice.__file__}")
    print(f"µs per {args.size}-byte packet per step, fastest of {args.reps} x {args.keys} packets "
          f"(load average {os.getloadavg()[0]:.2f}):")
    print(f"{'step':10}" + "".join(f"{name:>10}" for name in impls) + ("     ratio" if len(impls) > 1 else ""))
    totals = {name: 0.0 for name in impls}
    for step in STEPS:
        row = []
        for name in impls:
            med = min(results[name][step]) / 1000 if results[name][step] else float("nan")
            totals[name] += med
            row.append(med)
        ratio = f"{row[-1] / row[0]:10.2f}" if len(row) > 1 else ""
        print(f"{step:10}" + "".join(f"{v:10.2f}" for v in row) + ratio)
    row = list(totals.values())
    print(f"{'total':10}" + "".join(f"{v:10.2f}" for v in row) + (f"{row[-1] / row[0]:10.2f}" if len(row) > 1 else ""))


if __name__ == "__main__":
    main()
