"""New channels on an attached connection while the API cannot answer (a restart): within
`ORZ_GATEWAY_REAUTH_GRACE_S` of the API's last yes an `ssh -L` forward still opens; with 0 it is refused
with one readable line.

`orz server` (API, gateway, local runner) plus two `orz gateway` replicas that reach the API through a
proxy this test can cut: the real API stays up for the CLI, and the replicas see it go away as during a
restart (connections refused). The real `ssh -N -L` holds each attachment.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fullstack import FULLSTACK_MARKS, Platform, gateway_process, running_platform
from tests.relay import ThreadedRelay
from tests.support import free_port, wait_until

pytestmark = [*FULLSTACK_MARKS, pytest.mark.timeout(240)]
UNAVAILABLE = "orz: Orzbob Cloud is unavailable right now; try again shortly"


class ApiLink(ThreadedRelay):
    """A TCP relay to the API that can be cut: ``cut()`` stops listening and drops every open connection."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._writers: set[asyncio.StreamWriter] = set()

    def opened(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self._writers |= {client, upstream}

    async def close_all(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        await super().close_all()

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self.close_all(), self.loop).result(10)


@contextlib.contextmanager
def forward(platform: Platform, sid: str, gateway_port: int, remote_port: int,
            stderr: Path) -> Iterator[int]:
    """`ssh -N -L` through one gateway; yields the local port."""
    local = free_port()
    with stderr.open("w") as err:
        tunnel = subprocess.Popen(
            ["ssh", "-F", str(platform.home / ".ssh" / "config"), "-p", str(gateway_port), "-o", "BatchMode=yes",
             "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:{remote_port}", f"{sid}.orz"],
            env=platform.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            yield local
        finally:
            tunnel.terminate()
            tunnel.wait(10)


def fetch(port: int) -> str | None:
    """The page the session's web server shows through the forward; None if the forward gave nothing."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
    except httpx.HTTPError:
        return None


@pytest.fixture
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    # A short base: the session's tmux socket path must fit a unix socket name.
    with running_platform(tmp_path_factory.mktemp("ao")) as running:
        yield running


def test_a_new_forward_opens_within_the_grace_and_is_refused_without_it(platform: Platform,
                                                                        tmp_path: Path) -> None:
    sid, config = platform.bash_session()
    ssh = ["ssh", "-F", config, "-o", "BatchMode=yes", f"{sid}.orz"]
    # A web server on the session's own loopback, started through the platform's own gateway.
    port = random.randrange(20000, 30000)
    served = subprocess.run(
        [*ssh, f"echo in-the-session > index.html; setsid python3 -m http.server {port} --bind 127.0.0.1 "
               f">/dev/null 2>&1 </dev/null & for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/{port}) "
               "2>/dev/null && break; sleep 0.1; done; echo up"],
        env=platform.env, capture_output=True, text=True, timeout=60, check=False)
    assert served.stdout.strip() == "up", served.stderr

    with ApiLink(f"http://127.0.0.1:{platform.api_port}") as api:
        lenient, strict = free_port(), free_port()
        replica = {"ORZ_INTERNAL_API_URL": api.url, "ORZ_GATEWAY_DRAIN_S": "5"}
        with (gateway_process(platform, lenient, free_port(), name="lenient", **replica),
              gateway_process(platform, strict, free_port(), name="strict", ORZ_GATEWAY_REAUTH_GRACE_S="0",
                              **replica),
              forward(platform, sid, lenient, port, tmp_path / "lenient.err") as through_lenient,
              forward(platform, sid, strict, port, tmp_path / "strict.err") as through_strict):
            for local in (through_lenient, through_strict):  # attached, the API answering
                assert "in-the-session" in str(wait_until(lambda p=local: fetch(p), timeout=30, what="the forward"))

            api.cut()
            # Each fetch is a new connection to the forward: a new channel on the attached connection.
            assert "in-the-session" in (fetch(through_lenient) or "")
            assert fetch(through_strict) is None
            wait_until(lambda: UNAVAILABLE in (tmp_path / "strict.err").read_text(), timeout=10,
                       what="ssh's line for the refused channel")
            assert "allowed without the API" in (platform.log.parent / "lenient.log").read_text()
