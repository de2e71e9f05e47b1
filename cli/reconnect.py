"""`orz cloud attach` comes back by itself when the gateway it went through restarts.

ssh owns the terminal as before (stdin and stdout are its own); only its stderr passes through us, relayed
as it comes and watched for the line a draining gateway sends (api.schemas.GATEWAY_RESTARTING: in the
terminal when the drain starts, and in the SSH disconnect message at its deadline). When ssh then ends
with 255 (the connection went away, not the session), attach fetches a fresh certificate and runs ssh
again through the same address, which the load balancer sends to another replica. Nothing else
reconnects: a detach (tmux exits 0), a session that ended or was killed (its exit status, or the API
refusing the new certificate), ssh's own errors, or `~.`, all end attach as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import click

from api.schemas import GATEWAY_RESTARTING

SSH_LOST = 255  # ssh's own failure status: the connection ended without the session's exit status
# Waits before each attempt after a restart (a bounded number of them, then attach gives up).
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# ssh's lines for "could not get through" (nobody listening yet, the replica went while connecting).
_CONNECT_FAILURES = ("Connection refused", "Connection reset", "Connection closed by", "Connection timed out",
                     "kex_exchange_identification", "Broken pipe")
_TAIL = 8192  # bytes of ssh's stderr kept to look for those lines


@dataclass
class SshRun:
    status: int
    restarting: bool  # the gateway said it is restarting
    connect_failed: bool  # ssh never got through (or was cut off during the handshake)


def run_ssh(argv: list[str]) -> SshRun:
    """Run ssh in this terminal until it ends; its stderr reaches ours unchanged, as it is written."""
    # Ctrl-C belongs to ssh. A handler, not SIG_IGN: an ignored signal would stay ignored in ssh too.
    previous = signal.signal(signal.SIGINT, _ignore)
    try:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE)  # nosec B603  # an argv list, no shell
        assert proc.stderr is not None
        watch = _StderrWatch(proc.stderr.fileno())
        relay = threading.Thread(target=watch.relay, name="ssh-stderr", daemon=True)
        relay.start()
        status = proc.wait()
        relay.join(timeout=5)
        proc.stderr.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    text = watch.tail.decode(errors="replace")
    return SshRun(status=status, restarting=watch.restarting,
                  connect_failed=status == SSH_LOST and any(line in text for line in _CONNECT_FAILURES))


def attach_until_done(session_id: str, argv: list[str], fresh_argv: Callable[[], list[str]], *,
                      sleep: Callable[[float], None] = time.sleep) -> int:
    """Run ssh; after a gateway restart run it again (fresh certificate each time). ssh's last status."""
    attempts = 0
    while True:
        run = run_ssh(argv)
        if run.status != SSH_LOST:
            return run.status
        if run.restarting:
            attempts = 0  # a new restart: a fresh set of attempts
        elif not (attempts and run.connect_failed):
            return run.status  # lost for a reason of its own (not a restart): as before, no retry
        if attempts >= len(BACKOFF_S):
            click.echo(f"orz: could not reconnect to {session_id}; try again with: orz cloud attach {session_id}",
                       err=True)
            return run.status
        wait = BACKOFF_S[attempts]
        attempts += 1
        if attempts == 1:
            click.echo(f"\r\norz: the gateway restarted; reconnecting to {session_id}...\r", err=True)
        sleep(wait)
        argv = fresh_argv()


class _StderrWatch:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.tail = b""
        self.restarting = False
        self._marker = GATEWAY_RESTARTING.encode()

    def relay(self) -> None:
        out = sys.stderr.fileno()
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            _write_all(out, data)
            self.tail = (self.tail + data)[-_TAIL:]
            if self._marker in self.tail:
                self.restarting = True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            return  # our stderr is gone: keep reading so ssh never blocks on a full pipe


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    pass
