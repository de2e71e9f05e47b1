"""An in-memory provider for component tests and API benchmarks.

It stands in for real compute (local processes or Kubernetes pods): it records what it was asked and
keeps a phase per session, and can be told to fail, but it runs nothing. No runner ever heartbeats, so
sessions stay ``starting`` unless a test posts heartbeats itself.
"""

from __future__ import annotations

from api.instances.providers.base import (
    ComputeSpec,
    ComputeStatus,
    Provider,
    ProviderFailure,
    ProviderState,
)


class FakeProvider(Provider):
    name = "fake"
    reports_final_work = False  # no runner: a test that plays one sets it and sends the final report itself

    def __init__(self) -> None:
        self.phases: dict[str, str] = {}
        # Session id -> what the provider says about its compute's last OOM kill (ComputeStatus.out_of_memory).
        self.out_of_memory: dict[str, str] = {}
        # Session id -> what the provider says about its compute's phase (ComputeStatus.message: why it failed).
        self.messages: dict[str, str] = {}
        self.specs: dict[str, ComputeSpec] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_next: str | None = None
        self.logs: dict[str, str] = {}  # what read_log answers, per session (a test plays the runner's log)

    def _maybe_fail(self, op: str, session_id: str) -> None:
        self.calls.append((op, session_id))
        if self.fail_next:
            reason, self.fail_next = self.fail_next, None
            raise ProviderFailure(reason)

    async def read_log(self, session_id: str, state: ProviderState, limit: int = 65536) -> str:
        return self.logs.get(session_id, "")[-limit:]

    async def create(self, spec: ComputeSpec) -> ProviderState:
        self._maybe_fail("create", spec.session_id)
        self.phases[spec.session_id] = "running"
        self.specs[spec.session_id] = spec
        return {"fake": True, "generation": 1}

    async def start(self, spec: ComputeSpec, state: ProviderState) -> ProviderState:
        self._maybe_fail("start", spec.session_id)
        self.phases[spec.session_id] = "running"
        self.specs[spec.session_id] = spec
        return {**state, "generation": int(state.get("generation", 0)) + 1}

    async def stop(self, session_id: str, state: ProviderState) -> ProviderState:
        self._maybe_fail("stop", session_id)
        if session_id in self.phases:
            self.phases[session_id] = "stopped"
        return state

    async def delete(self, session_id: str, state: ProviderState) -> None:
        self._maybe_fail("delete", session_id)
        self.phases.pop(session_id, None)
        self.specs.pop(session_id, None)

    async def status(self, session_id: str, state: ProviderState) -> ComputeStatus:
        return ComputeStatus(phase=self.phases.get(session_id, "absent"),  # type: ignore[arg-type]
                             message=self.messages.get(session_id))

    async def list(self) -> dict[str, ComputeStatus]:
        return {sid: ComputeStatus(phase=p, message=self.messages.get(sid),  # type: ignore[arg-type]
                                   out_of_memory=self.out_of_memory.get(sid))
                for sid, p in self.phases.items()}
