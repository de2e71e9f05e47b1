"""One user's attached connections per gateway replica are capped (ORZ_GATEWAY_ATTACHMENTS_PER_USER): a
certificate is good for minutes and attach tokens come as fast as the API mints them, and each connection
holds a runner connection and file descriptors of the gateway every other user shares."""

from __future__ import annotations

import contextlib
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from tests.gateway.conftest import SESSION, TEAMMATE, USER, asyncssh_client, eventually, gateway_env
from tests.gateway.standins import FakeSession

REFUSED = b"you have 2 connections open through this gateway, the most one user may"


async def test_a_user_beyond_the_cap_is_refused_with_why_and_others_are_not(tmp_path: Path) -> None:
    async with gateway_env(tmp_path, gateway_attachments_per_user=2) as env:
        env.api.sessions["demo-2"] = FakeSession(owner=TEAMMATE, route=env.runner.route)
        async with contextlib.AsyncExitStack() as held:
            first = await held.enter_async_context(await asyncssh_client(env))
            await held.enter_async_context(await asyncssh_client(env))

            result = await env.ssh(*env.cert_args(), "--", "echo in")
            assert result.returncode != 0 and result.stdout == b"", result
            assert REFUSED in result.stderr, result.stderr
            assert not env.gateway.limiter.blocked("127.0.0.1")  # not a guess: nobody else is held back

            # The browser terminal counts too, and says why on the page.
            assert env.gateway.web is not None
            url = f"ws://127.0.0.1:{env.gateway.web.port}/v1/instances/{SESSION}/attach?token={env.token()}"
            async with connect(url, subprotocols=[Subprotocol("orz.terminal.v1")]) as ws:
                said = [await ws.recv() for _ in range(1)]
            assert "you have 2 connections open" in str(said), said

            # Another user of the same address and gateway attaches as usual.
            teammate = env.certificate(session_id="demo-2", user_id=TEAMMATE, name="tm")
            other = await env.ssh(*env.cert_args(teammate, name="tm"), "--", "echo in", session_id="demo-2")
            assert other.returncode == 0 and other.stdout == b"in\n", other

            # Closing one gives its slot back.
            first.close()
            await first.wait_closed()
            await eventually(lambda: env.gateway.attach_slots.held(USER) < 2, "the slot to be given back")
            again = await env.ssh(*env.cert_args(), "--", "echo in")
            assert again.returncode == 0 and again.stdout == b"in\n", again
