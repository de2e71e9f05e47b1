"""The compute provider interface: what the API asks of local processes or Kubernetes.

A provider turns a ComputeSpec into running compute for one session and back. It keeps no state of
its own that matters: everything needed to find the compute again (a pid, a pod name, a PVC) goes into
the ``ProviderState`` dict it returns, which the API persists on the instance row. A restarted API,
or a provider whose templates changed, can therefore always clean up what an earlier one made.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from api.cloud_yaml import DEFAULT_MAX_SERVICES
from api.schemas import RUNNER_OPERATOR_LOGGER, RunnerSpec

ProviderState = dict[str, Any]

# A record of the runner's log (runner/main.py LOG_FORMAT: "2026-12-05 10:01:02,345 INFO httpx: ..."); the lines
# after one up to the next are its continuation (a traceback).
RUNNER_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
OPERATOR_RECORD = re.compile(RUNNER_RECORD.pattern + re.escape(RUNNER_OPERATOR_LOGGER) + ": ")


def without_operator_records(text: str) -> str:
    """The runner's log without the records only operators may read (RUNNER_OPERATOR_LOGGER: git's words for
    a host it could not reach would map the operator's network), continuation lines and all: what every
    provider's read_log leaves out."""
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        if RUNNER_RECORD.match(line):
            dropping = bool(OPERATOR_RECORD.match(line))
        if not dropping:
            kept.append(line)
    return "".join(kept)
# What a session's compute is doing, as the reconciler (api/jobs/reconcile.py) reads it:
# - "absent": nothing of the session's compute exists (no process or Pod; the workspace may or may not);
# - "pending": asked for and coming up (image pull, scheduling, a process starting), not yet serving;
# - "running": the runner process or Pod is up (the session is `running` once the runner's heartbeat says so);
# - "stopped": released on purpose, the workspace kept (stop, idle reaping) or going away (terminating);
# - "failed": it ran and will not recover without a change (crash loop, bad image, a Pod that failed).
ComputePhase = Literal["absent", "pending", "running", "stopped", "failed"]


@dataclass(frozen=True)
class ComputeSpec:
    """Everything a provider needs to run one session's runner."""

    session_id: str
    org_id: str
    user_id: str
    tier: str
    resources: Mapping[str, str]
    repo_url: str | None
    branch: str | None
    program: str | None
    task: str | None
    api_url: str
    gateway_public_key: str
    heartbeat_interval_s: int
    # Secret material: never logged, never put on a command line or in a manifest in clear.
    runner_token: str = field(repr=False)
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Sidecars from ``.orz/cloud.yaml`` ``services:`` as plain data: [{name, image, env, ports, health}]
    # (schemas.SidecarSpec dumps), env values with their ``${SECRET}`` references unresolved.
    services: Sequence[Mapping[str, Any]] = ()
    # `orz cloud start --pull`: the runner moves the workspace to the branch's head first.
    pull: bool = False
    # How many services the session's plan allows (settings.services_for at creation).
    max_services: int = DEFAULT_MAX_SERVICES
    needs_input_after_s: float = 60.0
    work_scan_s: float = 15.0
    # Record the agent's pane in parts of at most this many bytes; 0: not recorded (the org said so).
    recording_max_bytes: int = 0
    # Who git commits in the session are by (the session's owner, service_base.owner_identity): the runner
    # makes them git's lowest-priority default, under any identity the repo or the user's dotfiles set.
    owner_name: str = ""
    owner_email: str = ""

    def runner_spec(self, *, ssh_host: str, ssh_port: int, workspace: str, state_dir: str,
                    **where: Any) -> RunnerSpec:
        """What the runner is told, from this spec; ``where`` are the provider's own fields (ssh_host and
        the rest: where the runner listens, keeps its files, finds its services)."""
        return RunnerSpec(
            session_id=self.session_id, api_url=self.api_url, repo_url=self.repo_url, branch=self.branch,
            program=self.program, task=self.task, gateway_public_key=self.gateway_public_key,
            heartbeat_interval_s=self.heartbeat_interval_s, secret_env=sorted(self.secret_env),
            ssh_host=ssh_host, ssh_port=ssh_port, workspace=workspace, state_dir=state_dir,
            pull=self.pull, max_services=self.max_services, needs_input_after_s=self.needs_input_after_s,
            work_scan_s=self.work_scan_s, recording_max_bytes=self.recording_max_bytes,
            owner_name=self.owner_name or None, owner_email=self.owner_email or None, **where,
        )


@dataclass(frozen=True)
class ComputeStatus:
    phase: ComputePhase
    message: str | None = None
    # The compute's last restart was the kernel's OOM killer's doing (its memory limit reached): what to tell
    # the user, one text per kill (it names when), so the reconciler records each kill once as an event.
    out_of_memory: str | None = None


class ProviderFailure(Exception):
    """The provider could not do what was asked; ``reason`` is safe to show the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Provider(abc.ABC):
    """Compute for sessions: local processes (LocalProvider), Kubernetes Pods (KubernetesProvider) or a
    recording stand-in for tests (FakeProvider).

    Required: ``create``, ``start``, ``stop``, ``delete``, ``status`` and ``list``. Optional (with
    defaults here): ``read_log``, ``isolates_sessions``, ``runner_socket``, ``check_services`` (with
    ``runs_services``) and ``close``. The gateway's route comes from the runner's heartbeat, not from here.

    Call order for one session, all from InstanceService (and the reconciler for ``list``/``stop``/
    ``delete`` of compute it finds unwanted): ``create`` once, with the ProviderState it returns saved on
    the row before anything else happens; then any number of ``stop`` -> ``start`` cycles, each given the
    last saved state; ``status`` at any time; finally ``delete``. Every call may be repeated after a crash
    of the API between the call and the row's update, so each must be idempotent, and each must work from
    the saved state alone (a restarted API has no memory of earlier calls). Failures the user should see
    are raised as ProviderFailure with a reason safe to show.
    """

    name: str = "base"
    # True when the provider runs ``services:`` as containers beside the runner (ComputeSpec.services):
    # its runners report the services they find, and the API restarts compute to add them.
    runs_services: bool = False
    # How long a runner may still run once its compute was asked to stop (SIGTERM until it is killed): the
    # latest its final recording upload can come. Its retired token takes that upload, and only it, this
    # long (docs/security.md#recordings). 0: stop() returns only once the runner is gone.
    runner_stop_grace_s: float = 0.0
    # True when a stopped runner reports the workspace's final state (a heartbeat whose work is ``final``):
    # a delete without force stops a live session and decides on that report. False (the fake provider,
    # which runs no runner): the delete decides on the last report it has.
    reports_final_work: bool = True

    @abc.abstractmethod
    async def create(self, spec: ComputeSpec) -> ProviderState:
        """Make the session's lasting resources (workspace) and start its compute."""

    @abc.abstractmethod
    async def start(self, spec: ComputeSpec, state: ProviderState) -> ProviderState:
        """Start compute again for a stopped session, on the workspace it kept."""

    @abc.abstractmethod
    async def stop(self, session_id: str, state: ProviderState) -> ProviderState:
        """Release compute; keep the workspace. Stopping stopped compute is not an error."""

    @abc.abstractmethod
    async def delete(self, session_id: str, state: ProviderState) -> None:
        """Remove everything the session had. Deleting what is already gone is not an error."""

    @abc.abstractmethod
    async def status(self, session_id: str, state: ProviderState) -> ComputeStatus:
        """What the compute is doing now."""

    @abc.abstractmethod
    async def list(self) -> dict[str, ComputeStatus]:
        """Every session this provider holds compute or workspace for, by session id."""

    async def read_log(self, session_id: str, state: ProviderState, limit: int = 65536) -> str:
        """The runner's log (init output), newest ``limit`` characters; empty when unknown."""
        return ""

    @property
    def isolates_sessions(self) -> bool:
        """False when sessions of different orgs could reach each other (the local provider, sandbox off)."""
        return True

    async def runner_endpoint_ok(self, session_id: str, state: ProviderState, host: str, port: int) -> bool:
        """Whether a heartbeat's TCP endpoint (ssh_host, ssh_port) is where this provider put the session's
        runner. The gateway connects there with the client key every runner trusts, so a runner (or the
        agent holding its token) that named another session's runner would send its users there. Providers
        that cannot tell accept it."""
        return True

    def runner_socket(self, session_id: str) -> str | None:
        """The unix socket the session's runner endpoint listens on (the only route accepted), or None: TCP."""
        return None

    def check_services(self, services: Sequence[Mapping[str, Any]], secret_keys: Collection[str],
                       max_services: int = DEFAULT_MAX_SERVICES) -> None:
        """Raise ProviderFailure, naming the file and key, when these services cannot run (runs_services)."""
        raise ProviderFailure(f"the {self.name} provider does not run services beside the runner")

    async def close(self) -> None:  # noqa: B027  (optional hook, nothing to release by default)
        """Release clients and watches held by the provider."""
