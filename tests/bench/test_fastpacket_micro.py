"""bench/fastpacket/_fastpacket.c, the C per-packet path measured for issue 22: what it seals asyncssh opens, and on
random malformed packets it decides as gateway/splice.py does (relayed with the same data, or left to asyncssh).

It is a measurement, not part of the product: the extension is built here into a temporary folder when gcc and
OpenSSL's headers are installed (`apt-get install gcc libssl-dev`), and these tests skip when they are not.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import fastpacket_fuzz, fastpacket_micro, fastpath_micro

SOURCE = Path(fastpacket_micro.__file__).resolve().parent / "fastpacket"


@pytest.fixture(scope="module")
def fp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    headers = (Path(sysconfig.get_paths()["include"]) / "Python.h", Path("/usr/include/openssl/evp.h"))
    if shutil.which("gcc") is None or shutil.which("make") is None or not all(h.exists() for h in headers):
        pytest.skip("gcc, make, Python's or OpenSSL's headers (libssl-dev) not installed: the C path is not built")
    out = tmp_path_factory.mktemp("fastpacket")
    subprocess.run(["make", "-s", "-C", str(SOURCE), f"OUT={out}/", f"PYTHON={sys.executable}"], check=True,
                   capture_output=True, timeout=120)
    return fastpacket_micro.load_extension(out)


@pytest.fixture
def loops() -> Iterator[tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]]:
    pair = (asyncio.new_event_loop(), asyncio.new_event_loop())
    yield pair
    for loop in pair:
        loop.close()


def test_keystrokes_cross_the_c_path_and_asyncssh_opens_every_echo(fp: Any, loops: Any) -> None:
    chain = fastpacket_micro.CChain(fp, loops[0], wired=True)
    packets = fastpath_micro._client_packets(chain.keys["client_up"], 0, 300)
    fastpacket_micro.run(chain, packets, None)
    echoes = fastpath_micro._open_all(chain.keys["client_down"], chain.to_client)
    chain.check(packets, echoes)
    assert b"".join(echoes) == bytes(97 + i % 26 for i in range(300))
    assert chain.client.state()["recv_seq"] == chain.upstream.state()["send_seq"] == 300


def test_several_packets_in_one_read_leave_as_one_write_and_a_partial_one_is_not_taken(fp: Any, loops: Any) -> None:
    chain = fastpacket_micro.CChain(fp, loops[0], wired=False)
    packets = fastpath_micro._client_packets(chain.keys["client_up"], 0, 5)
    stream = b"".join(packets)
    chain.gw_in(stream[:-7])  # four whole packets, then the fifth cut short
    assert chain.client.consumed == 4 * len(packets[0]) and chain.handed_over == 1
    assert len(chain.to_runner) == 1


def test_malformed_packets_get_splice_pys_verdict(fp: Any) -> None:
    counts = fastpacket_fuzz.fuzz(1500, seed=7, fp=fp)
    # The cases reached every verdict on both steps: relayed, left to asyncssh, and waiting for more bytes.
    for step in ("gw_in", "run_in"):
        for verdict in ("relayed", "asyncssh", "waits"):
            assert counts.get(f"{step} {verdict}", 0) > 20, counts


def test_every_side_of_the_micro_benchmark_carries_the_keys_cold(fp: Any, loops: Any) -> None:
    sides = [fastpacket_micro.RelayChain(), fastpacket_micro.CChain(fp, loops[0], wired=False),
             fastpacket_micro.CChain(fp, loops[0], wired=True), fastpacket_micro.PyChain(*loops)]
    for chain in sides:
        packets = fastpath_micro._client_packets(chain.keys["client_up"], 0, 20)
        timing = fastpacket_micro.run(chain, packets, bytearray(1 << 16))
        assert set(timing) == set(fastpath_micro.STEPS)
        to_client = chain.chain.to_client if isinstance(chain, fastpacket_micro.PyChain) else chain.to_client
        echoes = ([] if isinstance(chain, fastpacket_micro.RelayChain)
                  else fastpath_micro._open_all(chain.keys["client_down"], to_client))
        chain.check(packets, echoes)
