"""SSH transport details the gateway and the runner share (both speak asyncssh; the API itself does not).

Here rather than in gateway/ or runner/: each of them imports the `api` package already (schemas, client,
settings), neither may import the other, and the API must not import either (pyproject's import contracts).
asyncssh is not imported: these are mixins for its connection classes.
"""

from __future__ import annotations

from typing import Any

# The ciphers api.settings.SSH_CIPHERS allows are all AEAD, where the empty IGNORE packet asyncssh sends
# ahead of each packet (a defence for CBC-mode ciphers) protects nothing: SSH_MSG_IGNORE (RFC 4253 11.2)
# with an empty string.
AEAD_CIPHERS = frozenset({"aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"})
_MSG_IGNORE = 2
_EMPTY_STRING = b"\0\0\0\0"


class WithoutFiller:
    """Mixin for asyncssh connections (the gateway's two, the runner's endpoint): leave out the empty IGNORE
    packet asyncssh puts before each packet once an AEAD cipher is in use. Measured on a keystroke echo:
    half the packets the runner builds, seals and sends, and the gateway's fast path no longer hands one
    packet per echo to asyncssh."""

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,) and self._aead():
            return
        super().send_packet(pkttype, *args, handler=handler)  # type: ignore[misc]

    def _aead(self) -> bool:
        # Only once an authenticated-encryption cipher is in use; before that, behave as asyncssh does.
        return self.get_extra_info("send_cipher") in AEAD_CIPHERS  # type: ignore[attr-defined,no-any-return]
