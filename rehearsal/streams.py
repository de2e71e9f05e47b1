"""`pods/exec` and `pods/portforward` over WebSocket, the way the API server serves them to clients.

The official Python client (``kubernetes.stream``) speaks the channel protocol: each binary frame starts
with a channel byte. Exec uses 1 (stdout), 2 (stderr) and 3 (a Status object with the exit code);
port-forward gives each requested port a data channel (2i) and an error channel (2i+1), each opened
with the port number in two little-endian bytes. Only what the rehearsal's clients use is here: exec
without stdin, and one port per forward.
"""

from __future__ import annotations

import base64
import hashlib
import json
import select
import socket
import struct
import subprocess
from typing import Any

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHANNEL_PROTOCOL = "v4.channel.k8s.io"
OP_CONTINUATION, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x2, 0x8, 0x9, 0xA


def accept_key(client_key: str) -> str:
    """Sec-WebSocket-Accept for the client's Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + _GUID, usedforsecurity=False).digest()).decode()


def frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One unmasked server frame."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


class FrameReader:
    """Complete client frames out of a byte stream (masked frames, fragments joined)."""

    def __init__(self) -> None:
        self.buffer = b""
        self._fragments: list[bytes] = []
        self._fragment_op = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        messages: list[tuple[int, bytes]] = []
        while True:
            parsed = self._one()
            if parsed is None:
                return messages
            fin, opcode, payload = parsed
            if opcode >= OP_CLOSE or (opcode != OP_CONTINUATION and fin):  # control frames are never fragmented
                messages.append((opcode, payload))
            else:
                if opcode != OP_CONTINUATION:
                    self._fragment_op = opcode
                self._fragments.append(payload)
                if fin:
                    messages.append((self._fragment_op, b"".join(self._fragments)))
                    self._fragments = []

    def _one(self) -> tuple[bool, int, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode, masked, size = bool(buf[0] & 0x80), buf[0] & 0x0F, bool(buf[1] & 0x80), buf[1] & 0x7F
        at = 2
        if size == 126:
            if len(buf) < 4:
                return None
            size, at = struct.unpack("!H", buf[2:4])[0], 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size, at = struct.unpack("!Q", buf[2:10])[0], 10
        mask = b""
        if masked:
            if len(buf) < at + 4:
                return None
            mask, at = buf[at:at + 4], at + 4
        if len(buf) < at + size:
            return None
        payload = buf[at:at + size]
        self.buffer = buf[at + size:]
        return fin, opcode, _unmask(payload, mask) if masked else payload


def _readable(conn: Any, others: list[socket.socket], timeout_s: float | None) -> list[Any]:
    """select() that knows TLS sockets may hold decrypted bytes select cannot see."""
    if getattr(conn, "pending", lambda: 0)():
        return [conn]
    ready, _, _ = select.select([conn, *others], [], [], timeout_s)
    return ready


def exec_result(conn: Any, done: subprocess.CompletedProcess[bytes]) -> None:
    """Send what an exec printed and its exit status, then close the stream."""
    if done.stdout:
        conn.sendall(frame(b"\x01" + done.stdout))
    if done.stderr:
        conn.sendall(frame(b"\x02" + done.stderr))
    if done.returncode == 0:
        status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    else:
        status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                  "message": f"command terminated with non-zero exit code: {done.returncode}",
                  "details": {"causes": [{"reason": "ExitCode", "message": str(done.returncode)}]}}
    conn.sendall(frame(b"\x03" + json.dumps(status).encode()))
    conn.sendall(frame(struct.pack("!H", 1000), OP_CLOSE))


def forward(conn: Any, target: tuple[str, int], port: int) -> None:
    """Carry one port-forward stream between the client's WebSocket and a TCP connection to the Pod."""
    opening = struct.pack("<H", port)
    conn.sendall(frame(b"\x00" + opening) + frame(b"\x01" + opening))
    try:
        pod = socket.create_connection(target, timeout=10)
    except OSError as exc:
        conn.sendall(frame(b"\x01" + f"error forwarding port {port} to pod: {exc}".encode()))
        conn.sendall(frame(struct.pack("!H", 1011), OP_CLOSE))
        return
    reader = FrameReader()
    with pod:
        pod.settimeout(None)
        while True:
            for source in _readable(conn, [pod], 600):
                if source is pod:
                    data = pod.recv(65536)
                    if not data:
                        conn.sendall(frame(struct.pack("!H", 1000), OP_CLOSE))
                        return
                    conn.sendall(frame(b"\x00" + data))
                    continue
                data = conn.recv(65536)
                if not data:
                    return
                for opcode, payload in reader.feed(data):
                    if opcode == OP_CLOSE:
                        conn.sendall(frame(payload[:2], OP_CLOSE))
                        return
                    if opcode == OP_PING:
                        conn.sendall(frame(payload, OP_PONG))
                    elif opcode == OP_BINARY and payload[:1] == b"\x00" and len(payload) > 1:
                        pod.sendall(payload[1:])
