"""What the runner tells the API: its state, and the heartbeat loop that sends it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from api.client import ApiClient, ApiError
from api.schemas import AgentState, Heartbeat, InitStatus, ProgramEvent, SidecarSpec, WorkState, scrub_controls

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
# Heartbeat fields added for agent-aware sessions (#21), left out for an API that does not know them.
AGENT_FIELDS = ("agent_state", "agent_message", "agent_exit_code", "work")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Activity:
    """The runner's reportable state; every component writes its part here."""

    host_key: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    connections: int = 0
    last_input_at: datetime | None = None
    last_output_at: datetime | None = None
    init_status: InitStatus = "pending"
    program_running: bool = False
    program_exit_code: int | None = None
    fatal_error: str | None = None
    init_log_tail: str | None = None
    # The log tail is sent until one heartbeat carrying it succeeds, not in every heartbeat.
    init_log_sent: bool = False
    # Pod mode: services .orz/cloud.yaml names but the Pod lacks, sent with every heartbeat until restarted.
    services: list[SidecarSpec] | None = None
    # Program exits and restarts not yet delivered (a heartbeat carrying them got through: dropped).
    program_events: list[ProgramEvent] = field(default_factory=list)
    agent_state: AgentState | None = None
    agent_message: str | None = None
    agent_exit_code: int | None = None
    work: WorkState | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a connection ends: what it changed in the workspace is read now, not at the next periodic scan,
    # so a kill right after `ssh <id> 'edit ...'` or a detach is judged on the work as it is.
    rescan_work: asyncio.Event = field(default_factory=asyncio.Event)

    def note_input(self) -> None:
        self.last_input_at = utcnow()

    def poke(self) -> None:
        """Something notable happened: send a heartbeat now rather than at the next tick."""
        self.changed.set()

    def note_program(self, kind: str, message: str, exit_code: int | None = None) -> None:
        """Queue a program exit or restart for the API's session events, and send it now."""
        self.program_events = [*self.program_events, ProgramEvent.model_validate(
            {"kind": kind, "exit_code": exit_code, "message": scrub_controls(message[:1024])})][-16:]
        self.poke()

    def set_init_log(self, text: str | None) -> None:
        self.init_log_tail = text or None
        self.init_log_sent = False

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            host_key=self.host_key, ssh_host=self.ssh_host, ssh_port=self.ssh_port or None,
            attached_clients=self.connections, last_input_at=self.last_input_at,
            last_output_at=self.last_output_at, init_status=self.init_status,
            program_running=self.program_running, program_exit_code=self.program_exit_code,
            # Output of commands may hold NUL, which the API refuses: the report must still get through.
            fatal_error=scrub_controls(self.fatal_error[:4096]) if self.fatal_error else None,
            init_log_tail=(scrub_controls(self.init_log_tail[-65536:])
                           if self.init_log_tail and not self.init_log_sent else None),
            services=self.services,
            program_events=list(self.program_events) or None,
            agent_state=self.agent_state, agent_message=self.agent_message, agent_exit_code=self.agent_exit_code,
            work=self.work,
        )


class HeartbeatLoop:
    """POST a heartbeat every interval and on every poke; back off while the API is unreachable."""

    def __init__(self, client: ApiClient, session_id: str, activity: Activity, interval_s: float,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.session_id = session_id
        self.activity = activity
        self.interval_s = max(0.2, float(interval_s))
        self._refresh = refresh
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.legacy_api = False  # the API refused the agent fields once: they are left out from then on

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            await _wait(self.activity.changed, self.interval_s)
            self.activity.changed.clear()
            while not await self.send_once():
                # The API is down or refusing: retry sooner than the interval, but not in a tight loop.
                await _wait(self.activity.changed, backoff)
                self.activity.changed.clear()
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            backoff = 0.5

    async def send_once(self) -> bool:
        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception:
                log.exception("could not refresh activity before a heartbeat")
        body = self.activity.heartbeat()
        if self.legacy_api:
            body = body.model_copy(update=dict.fromkeys(AGENT_FIELDS))
        try:
            reply = await self.client.heartbeat(self.session_id, body)
        except ApiError as exc:
            if exc.status == 422 and not self.legacy_api and any(getattr(body, f) is not None for f in AGENT_FIELDS):
                # An API of the previous release (a rolling upgrade) refuses fields it does not know: go on
                # without the agent's state rather than lose the session's heartbeats.
                log.warning("the API refused the agent state (%s); sending heartbeats without it", exc.detail)
                self.legacy_api = True
                return await self.send_once()
            log.warning("heartbeat failed: %s", exc.detail)
            return False
        self.sent += 1
        current = self.activity.init_log_tail
        if body.init_log_tail is not None and current and body.init_log_tail == scrub_controls(current[-65536:]):
            self.activity.init_log_sent = True  # (unless the log changed while this one was in flight)
        if body.program_events:
            self.activity.program_events = [e for e in self.activity.program_events if e not in body.program_events]
        if reply.heartbeat_interval_s > 0:
            self.interval_s = float(reply.heartbeat_interval_s)
        return True

    async def flush(self, attempts: int = 3) -> bool:
        """Send the current state now, retrying briefly (used for the last word before exit)."""
        for attempt in range(attempts):
            if await self.send_once():
                return True
            await asyncio.sleep(0.3 * (attempt + 1))
        return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for the event or the time, whichever comes first.

    asyncio.timeout rather than wait_for: on 3.11 wait_for can swallow a cancellation that arrives
    as the event fires, which left this loop running after stop().
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
