"""/readyz when the database is slow: a prompt 503 that names the database, within the chart's probe timeout."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from api.app import create_app
from api.instances.providers.fake import FakeProvider
from api.routes.health import READY_DB_TIMEOUT_S
from api.serve import ApiServer
from api.settings import Settings


async def test_readyz_answers_503_naming_the_database_when_it_does_not_answer(tmp_path: Path) -> None:
    # A database that accepts connections and never answers (an overloaded or wedged server): the kernel
    # completes the handshake from the backlog, nothing ever replies.
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)
    url = f"postgresql://orz@127.0.0.1:{silent.getsockname()[1]}/orz"
    settings = Settings(data_dir=tmp_path / "data", database_url=url, provider="fake", require_schema_head=False)
    server = await ApiServer.start(create_app(settings, provider=FakeProvider()), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=15) as http:
            began = time.monotonic()
            reply = await http.get("/readyz")
            took = time.monotonic() - began
        assert reply.status_code == 503
        assert reply.json()["checks"]["database"] == f"no answer within {READY_DB_TIMEOUT_S:g} s"
        # Inside the chart's 3 s probe timeout: the kubelet records the reason, not a timeout of its own.
        assert took < 3.0
    finally:
        await server.stop()
        silent.close()
