"""The runner's exceptions: one root, a subclass per thing that can go wrong in a session."""

from __future__ import annotations


class RunnerError(Exception):
    """Something the runner cannot go on with; the message is safe to show the user."""


class CloudConfigError(RunnerError):
    """``.orz/cloud.yaml`` is unreadable or invalid; the message names the file, line and key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CloneError(RunnerError):
    """The repository could not be cloned."""


class InitError(RunnerError):
    """``setup.init`` failed or timed out."""


class ServiceError(RunnerError):
    """A sidecar service cannot run locally or failed its health check."""


class TmuxError(RunnerError):
    """The tmux CLI failed."""
