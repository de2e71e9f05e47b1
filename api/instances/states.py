"""The instance (session) lifecycle: states and the only legal transitions between them."""

from __future__ import annotations

from enum import StrEnum

from api.errors import InvalidTransition


class State(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


_ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.STARTING, State.FAILED, State.DELETING}),
    State.STARTING: frozenset({State.RUNNING, State.FAILED, State.STOPPING, State.DELETING}),
    State.RUNNING: frozenset({State.UNHEALTHY, State.STOPPING, State.FAILED, State.DELETING}),
    State.UNHEALTHY: frozenset({State.RUNNING, State.STOPPING, State.FAILED, State.DELETING}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED, State.DELETING}),
    State.STOPPED: frozenset({State.STARTING, State.DELETING}),
    State.FAILED: frozenset({State.STARTING, State.DELETING}),
    State.DELETING: frozenset({State.DELETED, State.FAILED}),
    State.DELETED: frozenset(),
}

# States that hold compute (or are about to) and so count against the plan's quota.
ACTIVE_STATES: frozenset[State] = frozenset(
    {State.PENDING, State.STARTING, State.RUNNING, State.UNHEALTHY, State.STOPPING}
)
# States a user can attach to right away.
ATTACHABLE_STATES: frozenset[State] = frozenset({State.RUNNING, State.UNHEALTHY})
# States from which `start` (or wake on connect) brings a session back.
STARTABLE_STATES: frozenset[State] = frozenset({State.STOPPED, State.FAILED})
# States in which the session is gone for the user.
GONE_STATES: frozenset[State] = frozenset({State.DELETING, State.DELETED})


def can_transition(current: State | str, target: State | str) -> bool:
    return State(target) in _ALLOWED[State(current)]


def check_transition(current: State | str, target: State | str) -> State:
    """Return the target state, or raise InvalidTransition naming both states."""
    cur, tgt = State(current), State(target)
    if tgt not in _ALLOWED[cur]:
        raise InvalidTransition(
            f"a {cur.value} session cannot become {tgt.value}", current_state=cur.value
        )
    return tgt
