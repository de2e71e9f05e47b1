"""CorkTransport (its TurnBatcher): a turn's first write leaves at once, the rest of the turn as one write.

And the gateway sends OpenSSH clients no SSH_MSG_IGNORE filler (it negotiates AES-GCM only)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.cork import CorkTransport
from tests.gateway.conftest import Env


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


async def test_first_write_of_a_turn_goes_out_at_once_the_rest_joined() -> None:
    inner = _Recorder()
    cork = CorkTransport(inner, asyncio.get_running_loop())
    cork.write(b"keystroke")
    assert inner.writes == [b"keystroke"]  # a lone echo waits for nothing
    cork.write(b"bulk-1")
    cork.write(b"bulk-2")
    assert inner.writes == [b"keystroke"]
    await asyncio.sleep(0)
    assert inner.writes == [b"keystroke", b"bulk-1bulk-2"]
    cork.write(b"next")  # a new turn
    cork.write(b"last")
    cork.close()  # close flushes first
    assert inner.writes[-2:] == [b"next", b"last"] and inner.closed


async def test_gateway_sends_the_client_no_ignore_filler(env: Env) -> None:
    result = await env.ssh(*env.cert_args(), "-vvv", "-o", "Ciphers=aes128-gcm@openssh.com", "--",
                           "sh -c 'echo one; echo two'")
    assert result.returncode == 0 and result.stdout == b"one\ntwo\n"
    log = result.stderr.decode()
    assert "aes128-gcm@openssh.com" in log
    assert "SSH2_MSG_IGNORE" not in log
