"""Random malformed packets through the C per-packet path (bench/fastpacket/_fastpacket.c) and gateway/splice.py:
both must give the same verdict on each (relayed with the same data, or left to asyncssh), and the C path must
not crash or read out of bounds (run it under valgrind or an ASan build for the latter: see bench/README.md).

Each case is one packet of the client's to the gateway (and the same packet to the runner's endpoint), built
from a valid CHANNEL_DATA packet with random mutations: of the plaintext before sealing (padding length,
message type, recipient, the data's length field, the packet's length off the block size, data up to 2 KiB,
across the C path's 512-byte stack buffer) or of the wire bytes after it (a flipped bit, cut short, a length
field replaced, trailing bytes). Sealing uses asyncssh's own GCMEncryption with the connection's nonce.

    python -m bench.fastpacket_fuzz [--cases 20000] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
from typing import Any

from asyncssh.encryption import GCMEncryption

import gateway.cork
import gateway.splice
from bench.fastpacket_micro import CChain, load_extension
from bench.fastpath_micro import CIPHER, Chain

MAX_DATA = 2048


def _plain(rng: random.Random) -> bytes:
    """A CHANNEL_DATA plaintext (padding length, type, recipient, data), valid or with one to three faults."""
    size = rng.choice((1, 1, 2, rng.randrange(1, 600), rng.randrange(1, MAX_DATA)))
    data = bytes(rng.randrange(256) for _ in range(min(size, 64))) * (size // 64 + 1)
    data = data[:size]
    recipient, ptype, field = 0, 94, size
    padlen = -(1 + 9 + size) % 16
    padlen += 16 if padlen < 4 else 0
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        fault = rng.randrange(8)
        if fault == 0:
            padlen = rng.randrange(256)
        elif fault == 1:
            ptype = rng.choice((93, 95, 96, 2, 0, 255))
        elif fault == 2:
            recipient = rng.choice((1, 7, 0xFFFFFFFF, rng.randrange(1 << 32)))
        elif fault == 3:
            field = rng.choice((0, size - 1, size + 1, size + padlen, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32)))
        elif fault == 4:
            data = data[:rng.randrange(len(data) + 1)]  # the length field now lies, the padding is off the block
        elif fault == 5:
            padlen = rng.randrange(4)  # too little padding, still whole blocks maybe not
        elif fault == 6:
            data = b""
        else:
            padlen += 16 * rng.randrange(1, 15) if padlen + 16 * 14 < 256 else 0
    head = struct.pack(">BBII", padlen & 0xFF, ptype, recipient & 0xFFFFFFFF, field & 0xFFFFFFFF)
    return head + data + bytes(rng.randrange(256) for _ in range(min(padlen & 0xFF, 255)))


def _wire(rng: random.Random, key: bytes, iv: bytes, plain: bytes) -> bytes:
    """`plain` sealed with the connection's current nonce, then perhaps mangled on the wire."""
    enc = GCMEncryption.new(CIPHER, key, iv)
    header = struct.pack(">I", len(plain))
    sealed, tag = enc.encrypt_packet(0, header, plain)
    pkt = sealed + tag
    fault = rng.randrange(10)
    if fault == 0:
        i = rng.randrange(len(pkt))
        pkt = pkt[:i] + bytes([pkt[i] ^ (1 << rng.randrange(8))]) + pkt[i + 1:]
    elif fault == 1:
        pkt = pkt[:rng.randrange(len(pkt))]
    elif fault == 2:
        pkt = struct.pack(">I", rng.choice((0, 1, 15, 16, 32, len(plain) + 16, 0xFFFFFFFF, 1 << 20,
                                            rng.randrange(1 << 32)))) + pkt[4:]
    elif fault == 3:
        pkt += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    return pkt


def _verdict_py(chain: Chain, conn: Any, fast: Any, out: list[bytes], pkt: bytes) -> tuple[str, bytes]:
    before_relayed, before_handed = fast.relayed_packets, conn.handed_over
    out.clear()
    fast.data_received(pkt)
    conn._inpbuf = b""  # a partial packet kept for the next read: each case stands alone
    if fast.relayed_packets > before_relayed:
        return "relayed", b"".join(out)
    assert not out, "nothing is sent for a packet left to asyncssh"
    return ("asyncssh" if conn.handed_over > before_handed else "waits"), b""


def _verdict_c(conn: Any, target: Any, pkt: bytes) -> tuple[str, bytes]:
    produced = conn.receive(pkt, target)
    if conn.consumed:
        return "relayed", produced
    assert produced == b"", "nothing is sent for a packet left to asyncssh"
    return "not", b""


def _open_data(key: bytes, iv: bytes, packets: bytes) -> bytes:
    """The channel data of the sealed CHANNEL_DATA packets in `packets`, opened with asyncssh."""
    enc = GCMEncryption.new(CIPHER, key, iv)
    data, pos = b"", 0
    while pos < len(packets):
        n = int.from_bytes(packets[pos:pos + 4], "big")
        plain = enc.decrypt_packet(0, packets[pos:pos + 4], packets[pos + 4:pos + 4 + n], 4,
                                   packets[pos + 4 + n:pos + 20 + n])
        assert plain is not None
        enc._cipher._update_iv()
        data += plain[10:len(plain) - plain[0]]
        pos += 20 + n
    return data


def fuzz(cases: int, seed: int, fp: Any = None) -> dict[str, int]:
    """Run `cases` cases; counts of each step's verdicts. `fp`: the extension module (default: bench/fastpacket/'s)."""
    rng = random.Random(seed)
    fp = fp or load_extension()
    gw_loop, run_loop = asyncio.new_event_loop(), asyncio.new_event_loop()
    py = Chain(gateway.splice, gateway.cork, gw_loop, run_loop)
    c = CChain(fp, gw_loop, wired=False, keys=py.keys)
    client_cipher = py.client._recv_encryption._cipher
    endpoint_cipher = py.endpoint._recv_encryption._cipher
    counts: dict[str, int] = {}
    for case in range(cases):
        plain = _plain(rng)
        # gateway in: the client's packet, sealed with the client connection's current nonce
        pkt = _wire(rng, client_cipher._key, client_cipher._iv, plain)
        runner_iv_py = py.upstream._send_encryption._cipher._iv
        v_py, out_py = _verdict_py(py, py.client, py.client.fast_path, py.to_runner, pkt)
        v_c, out_c = _verdict_c(c.client, c.upstream, pkt)
        if (v_py == "relayed") != (v_c == "relayed"):
            raise AssertionError(f"case {case} (seed {seed}): gateway in: splice.py {v_py}, C {v_c}: {pkt.hex()}")
        if v_py == "relayed":
            key = py.keys["runner_up"]
            assert _open_data(key, runner_iv_py, out_py) == _open_data(key, runner_iv_py, out_c), f"case {case}"
        counts[f"gw_in {v_py}"] = counts.get(f"gw_in {v_py}", 0) + 1
        # runner in: the same plaintext to the runner's endpoint (the C path hands the data back itself)
        pkt = _wire(rng, endpoint_cipher._key, endpoint_cipher._iv, plain)
        v_py, out_py = _verdict_py(py, py.endpoint, py.endpoint.fast_path, py.keys_seen, pkt)
        v_c, out_c = _verdict_c(c.endpoint, None, pkt)
        if (v_py == "relayed") != (v_c == "relayed") or out_py != out_c:
            raise AssertionError(f"case {case} (seed {seed}): runner in: splice.py {v_py}, C {v_c}: {pkt.hex()}")
        counts[f"run_in {v_py}"] = counts.get(f"run_in {v_py}", 0) + 1
    # Both kept the same nonces and sequence numbers through it all.
    state = c.client.state()
    assert state["recv_seq"] == py.client._recv_seq - 3 and state["relayed"] == py.client.fast_path.relayed_packets
    assert c.endpoint.state()["relayed"] == py.endpoint.fast_path.relayed_packets
    gw_loop.close()
    run_loop.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    counts = fuzz(args.cases, args.seed)
    print(f"{args.cases} cases, seed {args.seed}: the same verdict on every one")
    for name, n in sorted(counts.items()):
        print(f"  {name:20} {n}")


if __name__ == "__main__":
    main()
