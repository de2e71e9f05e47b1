"""The lifecycle state machine allows exactly the documented transitions."""

from __future__ import annotations

import itertools

import pytest

from api.errors import InvalidTransition
from api.instances.states import ACTIVE_STATES, State, can_transition, check_transition

LEGAL = {
    ("pending", "starting"), ("pending", "failed"), ("pending", "deleting"),
    ("starting", "running"), ("starting", "failed"), ("starting", "stopping"), ("starting", "deleting"),
    ("running", "unhealthy"), ("running", "stopping"), ("running", "failed"), ("running", "deleting"),
    ("unhealthy", "running"), ("unhealthy", "stopping"), ("unhealthy", "failed"), ("unhealthy", "deleting"),
    ("stopping", "stopped"), ("stopping", "failed"), ("stopping", "deleting"),
    ("stopped", "starting"), ("stopped", "deleting"),
    ("failed", "starting"), ("failed", "deleting"),
    ("deleting", "deleted"), ("deleting", "failed"),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product([s.value for s in State], repeat=2)))
def test_transition_table(src: str, dst: str) -> None:
    assert can_transition(src, dst) == ((src, dst) in LEGAL)
    if (src, dst) in LEGAL:
        assert check_transition(src, dst) == State(dst)
    else:
        with pytest.raises(InvalidTransition, match=f"a {src} session cannot become {dst}"):
            check_transition(src, dst)


def test_deleted_is_final_and_stopped_is_not_active() -> None:
    assert not any(can_transition("deleted", s) for s in State)
    assert State.STOPPED not in ACTIVE_STATES and State.FAILED not in ACTIVE_STATES
    assert State.RUNNING in ACTIVE_STATES
