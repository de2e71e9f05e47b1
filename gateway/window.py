"""Receive windows that count the data a paused channel still holds (the bridge's back-pressure).

The bridge pauses a channel's reading while the other side cannot take more (asyncssh pause_reading),
and asyncssh then keeps what arrives in the channel's receive buffer, up to the window it granted. But
when reading resumes, asyncssh tops the peer's window up to its full size as it delivers the *first*
buffered packet, while the rest of the buffer still waits: each pause and resume lets the peer send
nearly one more window. Measured through the gateway: a 64 MiB scp upload left 15 MiB queued in one
client channel whose window is 2 MiB, which stays in the process (glibc keeps the freed heap) as ~20 MB
of RSS after the transfer. Here the window granted back is what is free once the held data is counted,
so a channel never holds more than one window.

It overrides one method of asyncssh's channel (`_deliver_data`, not public API); `hold_window` leaves a
channel of an asyncssh that lacks the state it relies on (`missing_state`) as it is.
"""

from __future__ import annotations

from typing import Any

from asyncssh.channel import SSHChannel
from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.packet import UInt32

_CHAN_STATE = ("_recv_buf", "_recv_window", "_init_recv_window", "_encoding", "_session", "send_packet",
               "_deliver_data")


def _held_class(base: type) -> type:
    """`base` (an asyncssh channel class) whose window adjusts count the data still buffered."""

    def _deliver_data(self: Any, data: bytes, datatype: Any) -> None:
        if self._encoding:  # the bridge's channels carry bytes; decoding stays asyncssh's
            base._deliver_data(self, data, datatype)  # type: ignore[attr-defined]
            return
        # The free room is the peer's remaining window with what still waits in the buffer counted as used.
        held = sum(len(chunk) for chunk, _ in self._recv_buf)
        if self._recv_window + held < self._init_recv_window / 2:
            adjust = self._init_recv_window - self._recv_window - held
            self.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(adjust))
            self._recv_window += adjust
        if self._session is not None:
            self._session.data_received(data, datatype)

    # A subclass with no layout of its own, so that an existing channel's class can become it.
    return type(f"Held{base.__name__}", (base,), {"__slots__": (), "__module__": __name__,
                                                  "_deliver_data": _deliver_data, "holds_window": True,
                                                  "shares_constants": True})


_classes: dict[type, type] = {}


def missing_state(chan: Any) -> list[str]:
    """The channel attributes this module relies on that the installed asyncssh lacks."""
    return [f"channel.{name}" for name in _CHAN_STATE if not hasattr(chan, name)]


def hold_window(chan: Any) -> bool:
    """Make `chan` count held data in its window adjusts; False (left as it is) if it cannot."""
    base = type(chan)
    if getattr(base, "holds_window", False):
        return True
    if not isinstance(chan, SSHChannel) or missing_state(chan):
        return False
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = _held_class(base)
    chan.__class__ = cls
    return True
