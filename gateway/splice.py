"""The fast path for session bytes: CHANNEL_DATA relayed between the client's and the runner's connection.

A keystroke echo crosses the gateway twice, and on each crossing asyncssh runs its whole per-packet
machinery: packet parsing and dispatch, the channel's receive queue, the session callback, the other
channel's send buffer, packet logging, a keepalive timer reset and a fresh AES-GCM context per packet:
about as much CPU as the whole round trip through OpenSSH takes (bench/gateway.py). Here, once a bridged
channel pair is in its steady state, a CHANNEL_DATA packet is decrypted, re-addressed and re-encrypted
for the other connection directly, with the same flow-control, sequence-number and rekey bookkeeping
asyncssh keeps. Everything else (other packet types, stderr, a paused or full channel, key exchange,
a failed MAC, a malformed packet) is handed to asyncssh unchanged, at a packet boundary and in order,
so the fast path never decides a protocol question of its own.

The runner's endpoint uses the same machinery for its pty sessions (`deliver_locally`): there a channel's
data goes straight to the pty, and the pty's output leaves through `FastPath.send_data`.

It reads and updates asyncssh's connection and channel state, which is not public API: `compatible()`
checks that the state it needs is there (the tests fail if the installed asyncssh lacks it), and when
it is not, bridges run on asyncssh's own path as before.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import UInt32
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

_TAG = 16  # AES-GCM tag; the 4-byte packet length before it travels in the clear (associated data)
_BLOCK = 16  # AES-GCM's block: what follows the length is a whole number of blocks (RFC 5647)
_MIN_PAD = 4  # RFC 4253 6: at least four bytes of padding
# Per packet, one struct call where int.from_bytes/to_bytes on slices took several (bench/fastpath_micro.py).
_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from
_pack_u32 = _U32.pack
_unpack_chan_size = struct.Struct(">II").unpack_from  # CHANNEL_DATA's recipient channel and data length
_pack_data_head = struct.Struct(">BBII").pack  # padding length, CHANNEL_DATA, recipient channel, data length
_IV = struct.Struct(">4sQ")  # RFC 5647's nonce: a fixed field and a 64-bit invocation counter, one per packet
_unpack_iv = _IV.unpack
_pack_iv = _IV.pack
_COUNTER_MASK = (1 << 64) - 1
# Connection and channel attributes the fast path reads or keeps up to date.
_CONN_STATE = ("_inpbuf", "_recv_handler", "_recv_pkthdr", "_recv_encryption", "_recv_seq", "_recv_macsize",
               "_max_recv_pktlen", "_decompressor", "_channels", "_reset_keepalive_timer", "_transport",
               "internal_error", "_send_encryption", "_send_seq", "_send_blocksize", "_send_enchdrlen", "_compressor",
               "_kex_complete", "_auth_complete", "_rekey_bytes", "_rekey_bytes_sent", "_rekey_seconds",
               "_rekey_time")
_CHAN_STATE = ("_conn", "_recv_chan", "_send_chan", "_recv_state", "_send_state", "_recv_paused", "_recv_buf",
               "_recv_window", "_init_recv_window", "_send_buf", "_send_window", "_send_pktsize", "_session")
_GCM_STATE = ("_key", "_iv")
# Received data resets asyncssh's keepalive timer; doing it at most this often costs at worst one early
# keepalive probe, and saves a timer cancel and re-arm per packet.
_KEEPALIVE_RESET_EVERY_S = 1.0
# A kept AES-GCM context (OpenSSL's key schedule and GHASH tables, ~1.5 KiB outside Python's heap) is let go
# once its connection relayed or sealed nothing for a whole sweep period (so 1-2 periods after its last
# use): an idle attached session then holds none, and its next keystroke builds them again.
IDLE_SWEEP_S = 5.0


def missing_state(conn: Any, *chans: Any) -> list[str]:
    """The connection, channel and cipher attributes this module relies on that the installed asyncssh lacks."""
    missing = [f"connection.{name}" for name in _CONN_STATE if not hasattr(conn, name)]
    missing += sorted({f"channel.{name}" for chan in chans for name in _CHAN_STATE if not hasattr(chan, name)})
    for enc in (getattr(conn, "_recv_encryption", None), getattr(conn, "_send_encryption", None)):
        if type(enc) is GCMEncryption:
            cipher = getattr(enc, "_cipher", None)
            missing += [f"GCMCipher.{name}" for name in _GCM_STATE if not hasattr(cipher, name)]
    return list(dict.fromkeys(missing))


def compatible(conn: Any, *chans: Any) -> bool:
    """Whether the installed asyncssh keeps the state this module relies on."""
    return not missing_state(conn, *chans)


class _Padding:
    """Random padding bytes, drawn from the OS generator a few kilobytes at a time."""

    def __init__(self) -> None:
        self._pool = os.urandom(4096)
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > 4096:
            self._pool, pos, end = os.urandom(4096), 0, n
        self._pos = end
        return self._pool[pos:end]


_padding = _Padding()


@dataclass(slots=True, eq=False)
class Leg:
    """One direction of a bridged channel pair: data arriving on `src` leaves on `dst` (or goes to `sink`)."""

    src: Any  # asyncssh channel on the receiving connection
    dst: Any  # asyncssh channel on the other connection (None with a sink)
    out: FastPath | None  # the other connection's fast path, which sends on dst (None with a sink)
    counted: Callable[[int], None]  # bytes relayed here (the slow path counts in the session)
    idle: Callable[[], bool]  # the bridge holds nothing of its own for dst, so nothing can be overtaken
    sink: Callable[[bytes], None] | None = None  # takes the data in this process instead (the runner's pty)


class _Sealer:
    """An AESGCM context kept for one asyncssh GCM cipher (asyncssh builds a new one per packet)."""

    __slots__ = ("aead", "cipher", "mark")

    def __init__(self) -> None:
        self.cipher: Any = None
        self.aead: AESGCM | None = None
        self.mark = -1  # the packet count at the last sweep (_IdleSweep)

    def drop(self) -> None:
        self.cipher = self.aead = None
        self.mark = -1


class _IdleSweep:
    """One timer for the whole process: every IDLE_SWEEP_S it lets go of the contexts of fast paths that
    used none since the previous sweep. Only fast paths holding a context are listed, so idle sessions
    cost it nothing, and nothing is counted per packet (the connection's sequence numbers say enough)."""

    def __init__(self) -> None:
        self._paths: set[FastPath] = set()
        self._timer: Any = None
        self._loop: Any = None

    def add(self, path: FastPath) -> None:
        self._paths.add(path)
        loop = path._loop
        if self._timer is None or self._loop is not loop or loop.is_closed():
            self._loop = loop  # (a test's closed loop leaves a timer behind that never fires)
            self._timer = loop.call_later(IDLE_SWEEP_S, self._sweep)

    def discard(self, path: FastPath) -> None:
        self._paths.discard(path)

    def _sweep(self) -> None:
        self._timer = None
        for path in list(self._paths):
            if not path.forget_idle_contexts():
                self._paths.discard(path)
        if self._paths:
            self._timer = self._loop.call_later(IDLE_SWEEP_S, self._sweep)


_idle_sweep = _IdleSweep()


class FastPath:
    """Per asyncssh connection: relays its spliced channels' data, and sends data for the other side."""

    __slots__ = ("_keepalive_reset_at", "_loop", "_open", "_receive", "_seal", "conn", "legs", "relayed_packets",
                 "sent")

    def __init__(self, conn: Any, loop: Any, receive: Callable[[bytes], None] | None = None) -> None:
        self.conn = conn
        self._loop = loop
        # asyncssh's own receive path, for what is not relayed here (the connection's data_received, unless
        # the connection itself routes its input here: then the one it overrides).
        self._receive = receive or conn.data_received
        self.legs: dict[int, Leg] = {}
        self._open = _Sealer()
        self._seal = _Sealer()
        self._keepalive_reset_at = 0.0
        self.relayed_packets = 0  # packets received and relayed here without asyncssh's data path
        self.sent = 0  # data sent on channels here without asyncssh's data path (send_data calls)

    # -- wiring -----------------------------------------------------------------------------------

    def add(self, leg: Leg) -> None:
        self.legs[leg.src._recv_chan] = leg

    def remove(self, chan: Any) -> None:
        for number, leg in list(self.legs.items()):
            if leg.src is chan or leg.dst is chan:
                del self.legs[number]

    def close(self) -> None:
        """The connection is gone: let go of the kept contexts now rather than at the next sweep."""
        self._open.drop()
        self._seal.drop()
        _idle_sweep.discard(self)

    # -- kept AES-GCM contexts --------------------------------------------------------------------

    def _keep(self, sealer: _Sealer, cipher: Any, aead: AESGCM) -> AESGCM:
        """Keep `aead` for `cipher` (made anew after a key exchange replaced it, or after a sweep)."""
        sealer.cipher, sealer.aead, sealer.mark = cipher, aead, -1
        _idle_sweep.add(self)
        return aead

    def forget_idle_contexts(self) -> bool:
        """Drop the contexts not used since the last sweep; whether one is still kept."""
        kept = False
        # Packets relayed count uses of the opening context, the send sequence number uses of the sealing one
        # (asyncssh's own packets count there too: at worst a context lives one period longer).
        for sealer, count in ((self._open, self.relayed_packets), (self._seal, self.conn._send_seq)):
            if sealer.aead is None:
                continue
            if sealer.mark == count:
                sealer.drop()
            else:
                sealer.mark = count
                kept = True
        return kept

    # -- receiving --------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Bytes from the socket: relay the steady-state data packets, hand everything else to asyncssh.
        (One function with the relay loop: see _send on what a function costs per keystroke.)"""
        conn = self.conn
        if not self.legs or conn._recv_handler != conn._recv_pkthdr or conn._transport is None:
            self._receive(data)  # mid-packet, busy with an async handler or closing: asyncssh's turn
            return
        try:
            # At a packet boundary asyncssh's input buffer holds only whole-packet prefixes we left there.
            buf = conn._inpbuf + data if conn._inpbuf else data
            conn._inpbuf = b""
            now = time.monotonic()
            if now - self._keepalive_reset_at >= _KEEPALIVE_RESET_EVERY_S:
                self._keepalive_reset_at = now
                conn._reset_keepalive_timer()
            # Data of consecutive packets for one leg leaves as one send (bulk: fewer, fuller packets). A lone
            # packet (a keystroke, an echo) builds no list.
            batch_leg: Leg | None = None
            batch: bytes | list[bytes] = b""
            pos, end_of_buf = 0, len(buf)
            view = memoryview(buf)
            take = self._take_data
            while end_of_buf - pos >= 4:
                pktlen = _unpack_u32(buf, pos)[0]
                end = pos + 4 + pktlen + _TAG
                if pktlen > conn._max_recv_pktlen:
                    break  # asyncssh raises the protocol error
                if end > end_of_buf:
                    conn._inpbuf = bytes(view[pos:])  # a partial packet: wait for the rest at this boundary
                    pos = end_of_buf
                    break
                relayed = take(view, pos, end)
                if relayed is None:
                    if batch_leg is not None:  # what was relayed so far leaves before asyncssh acts on this packet
                        self._forward(batch_leg, batch)
                        batch_leg, batch = None, b""
                    self._receive(bytes(view[pos:end]))
                    if conn._recv_handler != conn._recv_pkthdr or conn._transport is None:
                        pos = end
                        break  # asyncssh is mid-way through something (an async handler, a close): its turn
                else:
                    leg, payload = relayed
                    if batch_leg is None:
                        batch_leg, batch = leg, payload
                    elif leg is batch_leg:
                        if type(batch) is list:
                            batch.append(payload)
                        else:
                            batch = [batch, payload]  # type: ignore[list-item]
                    else:
                        self._forward(batch_leg, batch)
                        batch_leg, batch = leg, payload
                pos = end
            else:
                if pos < end_of_buf:  # the first bytes of a packet's length: wait for the rest, as above
                    conn._inpbuf = bytes(view[pos:])
                    pos = end_of_buf
            if batch_leg is not None:
                self._forward(batch_leg, batch)
            if pos < end_of_buf:
                self._receive(bytes(view[pos:]))
        except Exception:
            # A bug here must not go unseen, nor take more than this connection with it: close it the
            # way asyncssh closes a connection whose input it failed to process.
            log.exception("gateway fast path failed; closing the connection")
            conn.internal_error()

    def _take_data(self, view: memoryview, start: int, end: int) -> tuple[Leg, bytes] | None:
        """The leg and data of a CHANNEL_DATA packet the fast path may relay now, having consumed it."""
        conn = self.conn
        enc = conn._recv_encryption
        if type(enc) is not GCMEncryption or conn._decompressor is not None or conn._recv_macsize != _TAG:
            return None
        if (end - start - 4 - _TAG) % _BLOCK:
            return None  # malformed (a zero-length packet too): asyncssh refuses it and disconnects
        cipher = enc._cipher
        opener = self._open
        # Without a kept context (a new connection, a rekey, a sweep), one for this packet alone: it is kept
        # below only if the packet is relayed, so keepalive replies to an idle connection keep nothing.
        aead = opener.aead if cipher is opener.cipher else AESGCM(cipher._key)
        iv = cipher._iv
        try:
            plain = aead.decrypt(iv, view[start + 4:end], view[start:start + 4])
        except InvalidTag:
            return None  # asyncssh reports the MAC failure and disconnects
        stop = len(plain)
        if stop < 10:
            return None  # too short for CHANNEL_DATA (a zero-length packet too): not ours to judge
        padlen = plain[0]
        stop -= padlen
        if padlen < _MIN_PAD or stop < 10 or plain[1] != MSG_CHANNEL_DATA:
            return None
        recipient, size = _unpack_chan_size(plain, 2)
        leg = self.legs.get(recipient)
        if leg is None:
            return None
        src = leg.src
        # (asyncssh drops data on a channel it is closing: leave that to it.)
        if (10 + size != stop or not 0 < size <= src._recv_window or src._recv_state != "open"
                or src._send_state in ("close_pending", "closed") or src._recv_paused or src._recv_buf
                or conn._channels.get(recipient) is not src or not leg.idle()):
            return None
        if aead is not opener.aead:
            self._keep(opener, cipher, aead)
        # Consumed: the same state asyncssh would leave after this packet (its GCMCipher._update_iv, inline).
        fixed, counter = _unpack_iv(iv)
        cipher._iv = _pack_iv(fixed, (counter + 1) & _COUNTER_MASK)
        conn._recv_seq = (conn._recv_seq + 1) & 0xFFFFFFFF
        window = src._recv_window - size
        if window < src._init_recv_window / 2:
            src._recv_window = window
            src.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(src._init_recv_window - window))
            window = src._init_recv_window
        src._recv_window = window
        self.relayed_packets += 1
        return leg, plain[10:stop]

    @staticmethod
    def _forward(leg: Leg, parts: bytes | list[bytes]) -> None:
        data = parts if type(parts) is bytes else b"".join(parts)
        if leg.sink is not None:
            leg.sink(data)
        elif leg.out is not None and leg.out.send_data(leg.dst, data):
            leg.counted(len(data))
        else:
            leg.src._session.data_received(data, None)  # exactly what asyncssh would have delivered

    # -- sending ----------------------------------------------------------------------------------

    def send_channel_data(self, args: tuple[bytes, ...]) -> bool:
        """Seal and send a CHANNEL_DATA packet asyncssh's channel built (its payload: recipient and data, as its
        send_packet would, minus a new AES-GCM context per packet); False leaves it to asyncssh. Only while
        channels are spliced here: with the fast path off, everything stays on asyncssh's path."""
        if not self.legs or len(args) != 1 or len(args[0]) < 8:
            return False
        payload = args[0]
        recipient, size = _unpack_chan_size(payload, 0)
        if size != len(payload) - 8 or not size:
            return False  # not the payload asyncssh's channels build: its own path judges it
        transport = self.conn._transport
        # (asyncssh counted the window itself; its writes go through the cork's turn batching.)
        return self._send(recipient, memoryview(payload)[8:], size, size, transport and transport.write)

    def send_data(self, chan: Any, data: bytes) -> bool:
        """Send `data` on `chan` as CHANNEL_DATA packets if nothing is queued ahead of it; False if not sent."""
        size = len(data)
        if chan._send_state != "open" or chan._send_buf or size > chan._send_window:
            return False  # asyncssh's path queues it behind what waits, or until the window opens
        transport = self.conn._transport
        # The batch is already whole: skip the cork's end-of-turn flush (a loop turn and a poll per send).
        write = transport and (getattr(transport, "write_now", None) or transport.write)
        if not self._send(chan._send_chan, data, size, chan._send_pktsize, write):
            return False
        chan._send_window -= size
        self.sent += 1
        return True

    def _send(self, recipient: int, data: bytes | memoryview, size: int, step: int,
              write: Callable[[bytes], None] | None) -> bool:
        """`data` for `recipient` as CHANNEL_DATA packets of at most `step` bytes, each padded, sealed and
        written as asyncssh would; False (nothing sent) if asyncssh must send it: it queues, defers during a
        key exchange, or starts a rekey.

        One function where four did the work: between keystrokes other processes run and the caches lose
        this code, and each further function costs about a microsecond to bring back
        (bench/fastpath_micro.py --cold)."""
        conn = self.conn
        enc = conn._send_encryption
        if (write is None or type(enc) is not GCMEncryption or conn._compressor is not None
                or not conn._kex_complete or not conn._auth_complete or conn._rekey_bytes_sent >= conn._rekey_bytes
                or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)):
            return False
        cipher = enc._cipher
        sealer = self._seal
        aead = sealer.aead if cipher is sealer.cipher else self._keep(sealer, cipher, AESGCM(cipher._key))
        blocksize, hdrlen = conn._send_blocksize, conn._send_enchdrlen + 9  # (+ type, recipient, length)
        for off in range(0, size, step):
            part = data[off:off + step] if size > step else data
            length = len(part)
            padlen = -(hdrlen + length) % blocksize  # RFC 4253 6: whole blocks, at least four bytes
            if padlen < _MIN_PAD:
                padlen += blocksize
            packet = b"".join((_pack_data_head(padlen, MSG_CHANNEL_DATA, recipient, length), part,
                               _padding.take(padlen)))
            header = _pack_u32(len(packet))
            iv = cipher._iv
            sealed = aead.encrypt(iv, packet, header)
            fixed, counter = _unpack_iv(iv)  # asyncssh's GCMCipher._update_iv, inline
            cipher._iv = _pack_iv(fixed, (counter + 1) & _COUNTER_MASK)
            try:  # noqa: SIM105 (contextlib.suppress would cost a context manager per packet)
                write(header + sealed)
            except ConnectionError:  # the connection is going; asyncssh ignores it too
                pass
            conn._send_seq = (conn._send_seq + 1) & 0xFFFFFFFF
            conn._rekey_bytes_sent += len(packet)
        return True


def splice(client_chan: Any, upstream_chan: Any, *, to_upstream: Callable[[int], None],
           to_client: Callable[[int], None], client_idle: Callable[[], bool] | None = None) -> bool:
    """Relay the pair's data on the fast path from now on; False (asyncssh's path stays) if it cannot.

    `client_idle` says whether the bridge holds nothing back for the client; without it, nothing ever is.
    """
    down_conn, up_conn = client_chan.get_connection(), upstream_chan.get_connection()
    down, up = getattr(down_conn, "fast_path", None), getattr(up_conn, "fast_path", None)
    if not isinstance(down, FastPath) or not isinstance(up, FastPath):
        return False
    if not (compatible(down_conn, client_chan) and compatible(up_conn, upstream_chan)):
        log.warning("gateway fast path off: this asyncssh keeps its connection state differently")
        return False
    down.add(Leg(client_chan, upstream_chan, up, to_upstream, _always))
    up.add(Leg(upstream_chan, client_chan, down, to_client, client_idle or _always))
    return True


def deliver_locally(chan: Any, sink: Callable[[bytes], None], idle: Callable[[], bool]) -> FastPath | None:
    """Hand `chan`'s incoming data to `sink` on the fast path from now on (asyncssh still takes everything
    else, and the data whenever `idle()` is False); the connection's FastPath, to send on `chan` with, or
    None (asyncssh's path stays) if it cannot. `forget(chan)` undoes it."""
    conn = chan.get_connection()
    fast = getattr(conn, "fast_path", None)
    if not isinstance(fast, FastPath):
        return None
    if not compatible(conn, chan):
        log.warning("fast path off: this asyncssh keeps its connection state differently")
        return None
    fast.add(Leg(chan, None, None, _uncounted, idle, sink))
    return fast


def forget(chan: Any) -> None:
    """Undo `deliver_locally`; the channel may already be closed."""
    fast = getattr(getattr(chan, "_conn", None), "fast_path", None)
    if isinstance(fast, FastPath):
        fast.remove(chan)


def unsplice(client_chan: Any, upstream_chan: Any) -> None:
    """Forget the pair on both connections; either channel may already be closed (or None)."""
    for chan in (client_chan, upstream_chan):
        # A closed channel has let go of its connection (get_connection() would assert): nothing to do.
        fast = getattr(getattr(chan, "_conn", None), "fast_path", None)
        if isinstance(fast, FastPath):
            fast.remove(client_chan)
            fast.remove(upstream_chan)


def _always() -> bool:
    return True


def _uncounted(size: int) -> None:
    return None
