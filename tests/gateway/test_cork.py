"""CorkTransport (its TurnBatcher): a turn's first write leaves at once, the rest of the turn as one write.

And the gateway sends OpenSSH clients no SSH_MSG_IGNORE filler (it negotiates AES-GCM only), through the one
filter (api.ssh_transport) the runner's endpoint uses too."""

from __future__ import annotations

import asyncio
from typing import Any

from api.ssh_transport import WithoutFiller
from gateway.cork import CorkTransport, RunnerSideConnection
from gateway.server import ClientSideConnection
from runner import sshd
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


class _Connection:
    """What WithoutFiller sees of an asyncssh connection: the packets it sends, and its cipher."""

    def __init__(self, cipher: str | None) -> None:
        self.cipher = cipher
        self.sent: list[tuple[int, tuple[bytes, ...]]] = []

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        self.sent.append((pkttype, args))

    def get_extra_info(self, name: str) -> str | None:
        return self.cipher if name == "send_cipher" else None


class _Filtered(WithoutFiller, _Connection):
    pass


def test_one_filler_filter_for_the_gateway_and_the_runner() -> None:
    """The empty IGNORE packet is left out once an AEAD cipher is on; everything else is sent as asyncssh would."""
    empty_ignore, data = (2, (b"\0\0\0\0",)), (94, (b"\0\0\0\1", b"payload"))
    before, aead = _Filtered(None), _Filtered("aes128-gcm@openssh.com")
    for conn in (before, aead):
        conn.send_packet(empty_ignore[0], *empty_ignore[1])
        conn.send_packet(2, b"\0\0\0\3abc")  # an IGNORE with content is someone's on purpose
        conn.send_packet(data[0], *data[1])
    assert before.sent == [empty_ignore, (2, (b"\0\0\0\3abc",)), data]
    assert aead.sent == [(2, (b"\0\0\0\3abc",)), data]
    # The gateway's two connections and the runner's endpoint share this one class.
    for cls in (ClientSideConnection, RunnerSideConnection, sshd._EndpointConnection):
        assert issubclass(cls, WithoutFiller), cls
