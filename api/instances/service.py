"""Instance lifecycle: the only place that touches the provider and the database together.

Every state change goes through ``_transition``, a conditional UPDATE (``WHERE state = <expected>``)
that also writes the audit event, so two concurrent requests can never both move the same session.
Provider calls happen outside database transactions; a failed provider call leaves the session in
``failed`` with a reason the user can read, and never leaves compute running without a row.

InstanceService is one object with one method per thing its callers ask, written in one module per
caller: user_side (the API's users: queries and the lifecycle), scheduler_side (api/jobs), runner_side
(heartbeats), gateway_side (authorize, access checks, attach events), on service_base (state and helpers).
"""

from __future__ import annotations

from api.instances.gateway_side import GatewaySide
from api.instances.runner_side import RunnerSide
from api.instances.scheduler_side import SchedulerSide
from api.instances.service_base import Clock, SecretEnvSource
from api.instances.user_side import UserSide

__all__ = ["Clock", "InstanceService", "SecretEnvSource"]


class InstanceService(UserSide, SchedulerSide, RunnerSide, GatewaySide):
    """Sessions' lifecycle for every caller (the constructor is ServiceBase's)."""
