"""Crafted SSH packets for the gateway's receive side: sealed with the keys the gateway itself holds.

A test that wants to send the gateway a packet no well-behaved client sends (zero length, bad padding,
an unknown channel, a window overrun) cannot ask asyncssh or OpenSSH to build it. Instead, once a real
client has finished its key exchange, `Sealer` reads the AES-GCM key and nonce the gateway expects next
(asyncssh's state, read only) and seals packets the gateway will accept as authentic, which the test then
feeds to the gateway connection's receive path exactly as the socket would.
"""

from __future__ import annotations

import os
from typing import Any

from asyncssh.constants import MSG_CHANNEL_DATA
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK = 16  # AES-GCM: the encrypted part of a packet is a whole number of blocks


def _next_iv(iv: bytes) -> bytes:
    """RFC 5647: the last 8 bytes of the nonce count packets."""
    counter = (int.from_bytes(iv[4:], "big") + 1) % (1 << 64)
    return iv[:4] + counter.to_bytes(8, "big")


class Sealer:
    """Seals packets in sequence for one asyncssh connection's receive direction (AES-GCM only)."""

    def __init__(self, conn: Any) -> None:
        cipher = conn._recv_encryption._cipher
        self._aead = AESGCM(cipher._key)
        self._iv = cipher._iv

    def seal(self, body: bytes, *, length: int | None = None) -> bytes:
        """One packet: 4-byte length (`length` may lie about it), then `body` encrypted, then its tag."""
        declared = len(body) if length is None else length
        header = declared.to_bytes(4, "big")
        sealed = self._aead.encrypt(self._iv, body, header)
        self._iv = _next_iv(self._iv)
        return header + sealed

    def payload(self, payload: bytes, *, padlen: int | None = None) -> bytes:
        """A well-padded packet around `payload` (or with the padding length byte given)."""
        pad = -(1 + len(payload)) % BLOCK
        if pad < 4:
            pad += BLOCK
        padding = os.urandom(pad)
        return self.seal(bytes([pad if padlen is None else padlen]) + payload + padding)


def channel_data(channel: int, data: bytes, *, size: int | None = None) -> bytes:
    """SSH_MSG_CHANNEL_DATA's payload; `size` may disagree with the data actually carried."""
    declared = len(data) if size is None else size
    return bytes([MSG_CHANNEL_DATA]) + channel.to_bytes(4, "big") + declared.to_bytes(4, "big") + data
