"""bench/fastpath_micro.py's chain carries real AES-GCM packets through gateway/splice.py's four steps.

No timing is checked (speed belongs in bench/); the chain's own check is: every key reached the runner's
sink and came back to the client, decryptable and in order, and no packet left the fast path. The packets
are sealed by asyncssh and opened by asyncssh, so a fast path that seals, pads or advances the nonce
differently from asyncssh fails here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import String, UInt32

import gateway.cork
import gateway.splice
from bench import fastpath_micro

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def chain() -> Iterator[fastpath_micro.Chain]:
    loops = [asyncio.new_event_loop(), asyncio.new_event_loop()]
    try:
        yield fastpath_micro.Chain(gateway.splice, gateway.cork, *loops)
    finally:
        for loop in loops:
            loop.close()


def test_keys_cross_all_four_steps_and_come_back_readable(chain: fastpath_micro.Chain) -> None:
    packets = fastpath_micro._client_packets(chain.keys["client_up"], 0, 300)
    chain.run(packets)
    echoes = fastpath_micro._open_all(chain.keys["client_down"], chain.to_client)
    chain.check(packets, echoes)
    assert b"".join(echoes) == bytes(97 + i % 26 for i in range(300))
    # The state asyncssh keeps for each connection moved on by one packet per key, as its own path would.
    assert chain.client._recv_seq == chain.upstream._send_seq == chain.endpoint._recv_seq == 3 + 300


def test_packets_split_and_coalesced_across_reads_all_take_the_fast_path(chain: fastpath_micro.Chain) -> None:
    """Reads that end mid-packet (kept in asyncssh's input buffer) and reads holding several packets."""
    packets = fastpath_micro._client_packets(chain.keys["client_up"], 0, 40)
    stream = b"".join(packets)
    receive = chain.client.fast_path.data_received
    for at in range(0, len(stream), 101):  # reads of 101 bytes end inside a packet (48 bytes each) but the last
        receive(stream[at:at + 101])
    assert chain.client._inpbuf == b"" and chain.client.handed_over == 0
    assert chain.client.fast_path.relayed_packets == 40
    # Several packets of one read left as one send to the runner, the data joined in order.
    enc = GCMEncryption.new(fastpath_micro.CIPHER, chain.keys["runner_up"], chain.keys["runner_up"][:12])
    data = b""
    for pkt in chain.to_runner:
        plain = enc.decrypt_packet(0, pkt[:4], pkt[4:-16], 4, pkt[-16:])
        assert plain is not None and plain[1] == MSG_CHANNEL_DATA
        data += plain[10:len(plain) - plain[0]]
    assert data == bytes(97 + i % 26 for i in range(40))
    assert len(chain.to_runner) < 40


def test_the_nonce_advances_as_asyncssh_advances_it_across_the_counter_wrap(chain: fastpath_micro.Chain) -> None:
    cipher = chain.endpoint._send_encryption._cipher
    twin = GCMEncryption.new(fastpath_micro.CIPHER, cipher._key, cipher._iv[:4] + b"\xff" * 7 + b"\xfe")._cipher
    cipher._iv = twin._iv
    for _ in range(3):  # ...fe, ...ff, then the 64-bit counter wraps to 0
        assert chain.run_fast is not None and chain.run_fast.send_data(chain.run_chan, b"k")
        twin._update_iv()
        assert cipher._iv == twin._iv
    assert cipher._iv[4:] == b"\0" * 7 + b"\x01"


def test_padding_is_fresh_across_the_pool_boundary() -> None:
    pad = gateway.splice._Padding()
    taken = [pad.take(255) for _ in range(40)]  # 10,200 bytes: past two 4 KiB pools
    assert all(len(p) == 255 for p in taken)
    assert len(set(taken)) == len(taken)


def test_the_micro_benchmark_runs_against_another_tree() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.fastpath_micro", "--keys", "50", "--reps", "1",
                          "--against", str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    for step in (*fastpath_micro.STEPS, "total"):
        assert step in out.stdout


def test_data_asyncssh_queued_is_sealed_on_the_fast_path_as_its_channel_built_it(
        chain: fastpath_micro.Chain) -> None:
    """WithoutFiller.send_packet hands the fast path the payload asyncssh's channel built (recipient, then the
    data as an SSH string, in one bytes); anything else stays with asyncssh."""
    fast = chain.client.fast_path
    assert fast.send_channel_data((UInt32(7) + String(b"queued"),))
    assert not fast.send_channel_data((UInt32(7), String(b"two parts")))
    assert not fast.send_channel_data((UInt32(7) + UInt32(99) + b"short",))  # a length that lies
    assert not fast.send_channel_data((UInt32(7) + String(b""),))
    enc = GCMEncryption.new(fastpath_micro.CIPHER, chain.keys["client_down"], chain.keys["client_down"][:12])
    (pkt,) = chain.to_client  # (the cork's batched write: this test's loop never runs, so it went at once)
    plain = enc.decrypt_packet(0, pkt[:4], pkt[4:-16], 4, pkt[-16:])
    assert plain is not None and plain[1] == MSG_CHANNEL_DATA
    assert plain[2:len(plain) - plain[0]] == UInt32(7) + String(b"queued")
    assert chain.client._send_seq == 4
