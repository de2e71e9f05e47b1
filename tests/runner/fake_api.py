"""A stand-in for the API's internal heartbeat route (``POST /internal/v1/instances/{id}/heartbeat``).

It is a few lines of asyncio HTTP/1.1 on 127.0.0.1:0 that records every accepted heartbeat body and
answers with a HeartbeatReply, so runner tests (in-process or as a child of the LocalProvider) can watch
what a runner reports without the database. Like the real route it takes only the runner token it was
told for that session (``expect``) and answers 401 otherwise; tests/runner/test_api_contract.py runs the
same requests against the real API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tests.support import serve_json


@dataclass
class FakeApi:
    interval_s: int = 1
    heartbeats: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    runner_tokens: dict[str, str] = field(default_factory=dict)  # session id -> its runner token
    rejected: list[str] = field(default_factory=list)  # session ids of refused heartbeats
    fail: bool = False
    # Fields an API of an earlier release does not know: a body with one is refused (422), as it would.
    unknown_fields: frozenset[str] = frozenset()
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> FakeApi:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._conns):
                writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def expect(self, session_id: str, runner_token: str) -> None:
        """Accept heartbeats for ``session_id`` with this token (the API's record of the token it issued)."""
        self.runner_tokens[session_id] = runner_token

    def bodies(self, session_id: str | None = None) -> list[dict[str, Any]]:
        return [b for sid, b, _ in self.heartbeats if session_id is None or sid == session_id]

    async def wait_for(self, predicate: Any, timeout: float = 15.0,
                       session_id: str | None = None) -> dict[str, Any]:
        """The first heartbeat (old or new) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            for body in self.bodies(session_id):
                if predicate(body):
                    return body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                last = self.bodies(session_id)[-3:]
                raise AssertionError(f"no matching heartbeat in {timeout}s; got {last}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            await serve_json(reader, writer, self._handle)
        finally:
            self._conns.discard(writer)
            writer.close()

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if self.fail:
            return 503, {"title": "down", "status": 503, "detail": "down", "code": "down", "type": "x"}
        if method == "POST" and parts[:3] == ["internal", "v1", "instances"] and parts[-1] == "heartbeat":
            sid, auth = parts[3], headers.get("authorization")
            if not auth:
                return self._unauthorized(sid, "missing Authorization: Bearer <token> header")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return self._unauthorized(sid, "the Authorization header must be 'Bearer <token>'")
            expected = self.runner_tokens.get(sid)
            if expected is None or not hmac.compare_digest(token.strip().encode(), expected.encode()):
                return self._unauthorized(sid, "invalid runner token")
            parsed = json.loads(body or b"{}")
            extra = sorted(self.unknown_fields & set(parsed))
            if extra:
                return 422, {"type": "about:blank", "title": "Invalid request", "status": 422,
                             "code": "invalid_request", "detail": f"{extra[0]}: extra inputs are not permitted"}
            self.tokens.append(auth)
            self.heartbeats.append((sid, parsed, time.monotonic()))
            self._changed.set()
            return 200, {"state": "running", "heartbeat_interval_s": self.interval_s}
        return 404, {"title": "not found", "status": 404, "detail": "no route", "code": "not_found",
                     "type": "about:blank"}

    def _unauthorized(self, session_id: str, detail: str) -> tuple[int, Any]:
        self.rejected.append(session_id)
        return 401, {"type": "https://orz.cloud/problems/unauthorized", "title": "Authentication required",
                     "status": 401, "code": "unauthorized", "detail": detail}
