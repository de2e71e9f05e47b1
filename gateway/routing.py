"""Ask the API whether a principal may attach, wait for a waking session, and report attaches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from api.client import ApiClient, ApiError, ApiUnreachable
from api.schemas import AttachEventIn, AuthFailureIn, AuthFailureReply, AuthorizeReply, AuthorizeRequest
from gateway.auth import AttachCredential
from gateway.errors import ApiUnavailable, AttachRefused

log = logging.getLogger(__name__)

WAKING_STATES = frozenset({"pending", "starting", "stopping", "stopped", "unhealthy"})
# What a user reads for each refusal code when the API gives no detail of its own.
DEFAULT_LINES = {
    "not_found": "no such session",
    "forbidden": "this session is not yours",
    "unauthorized": "your credential was not accepted",
    "session_failed": "session failed",
    "quota_exceeded": "active session quota reached",
}
UNAVAILABLE_LINE = "Orzbob Cloud is unavailable right now; try again shortly"


class Router:
    """The gateway's view of the API: one ApiClient with the service token."""

    def __init__(self, api: ApiClient, *, poll_interval_s: float = 1.0, start_timeout_s: float = 600) -> None:
        self.api = api
        self.poll_interval_s = poll_interval_s
        self.start_timeout_s = start_timeout_s

    async def authorize(self, session_id: str, principal: AttachCredential, *, source: str | None,
                        first: bool = True, wake: bool = True) -> AuthorizeReply:
        """One authorize call; API refusals become AttachRefused with the line to show, an API that gave
        no answer ApiUnavailable."""
        request = AuthorizeRequest(
            session_id=session_id, user_id=principal.user_id, method=principal.method,  # type: ignore[arg-type]
            # The jti is spent by the first call; polls while the session wakes must not replay it.
            jti=principal.jti if first else None,
            jti_expires_at=(datetime.fromtimestamp(principal.expires_at, UTC)
                            if first and principal.expires_at else None),
            readonly=principal.readonly, source_address=source, wake=wake,
        )
        try:
            reply = await self.api.authorize(request)
        except ApiUnreachable as exc:
            raise ApiUnavailable(UNAVAILABLE_LINE, code="unavailable", internal=str(exc)) from exc
        except ApiError as exc:
            # The API's cap on the gateway's own connections (api/serve.py) is no refusal of this user.
            if exc.status >= 500 or exc.status == 0 or exc.code == "too_many_connections":
                raise ApiUnavailable(UNAVAILABLE_LINE, code=exc.code, internal=f"{exc.status} {exc.code}") from exc
            line = exc.detail or DEFAULT_LINES.get(exc.code, "attach refused")
            raise AttachRefused(line, code=exc.code, internal=f"{exc.status} {exc.code}") from exc
        if reply.state == "failed":
            reason = reply.message or "no reason given"
            raise AttachRefused(f"session failed: {reason}", code="session_failed")
        if reply.state in ("deleting", "deleted"):
            raise AttachRefused("no such session", code="not_found")
        return reply

    async def until_running(self, session_id: str, principal: AttachCredential, reply: AuthorizeReply, *,
                            source: str | None, progress: Callable[[str], None]) -> AuthorizeReply:
        """Poll authorize while a stopped session wakes, reporting each new state as a progress line."""
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while not (reply.state == "running" and reply.route is not None):
            if reply.state not in WAKING_STATES and reply.state != "running":
                raise AttachRefused(f"session is {reply.state}", code="not_running")
            line = reply.message or f"session {session_id} is {reply.state}: starting it..."
            if line != last:
                progress(line)
                last = line
            if time.monotonic() > deadline:
                raise AttachRefused("session did not start in time; try again", code="start_timeout")
            await asyncio.sleep(self.poll_interval_s)
            reply = await self.authorize(session_id, principal, source=source, first=False)
        return reply

    async def report_failure(self, source: str) -> AuthFailureReply | None:
        """Count a failed authentication where every replica sees it; None when the API cannot say."""
        try:
            return await self.api.report_auth_failure(AuthFailureIn(source_address=source))
        except (ApiError, ApiUnreachable) as exc:
            log.warning("failed authentication from %s not shared: %s", source, type(exc).__name__)
            return None

    async def report(self, event: AttachEventIn) -> None:
        """Best effort: an attach must not fail because activity reporting did."""
        try:
            await self.api.attach_event(event)
        except ApiError as exc:
            log.warning("attach event %s for %s not recorded: %s", event.event, event.session_id, exc.code)
