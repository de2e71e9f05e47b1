"""Turn any failure into one readable line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import asyncio
import functools
import select
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import click

from api.client import ApiError
from api.errors import OrzError, SchemaNotAtHead
from api.schemas import scrub_controls

P = ParamSpec("P")
T = TypeVar("T")


# Exit codes (docs/cli.md): scripts tell "log in again" from "no such session" from a typo.
EXIT_ERROR = 1  # anything else: the API refused, could not be reached, a session failed, Ctrl-C
EXIT_USAGE = 2  # click's usage errors (unknown option, bad value), and input refused as invalid (HTTP 422)
EXIT_NOT_FOUND = 3  # no such session or secret (HTTP 404)
EXIT_AUTH = 4  # not logged in, or the API refused the token (HTTP 401)
EXIT_FORBIDDEN = 5  # logged in, but not allowed (HTTP 403: a colleague's session, an org-admin action)
EXIT_UNSAVED_WORK = 6  # `kill` refused: the workspace holds changes or commits its origin does not (--force)


SHOWN_MAX = 48  # characters of something the user typed that an error quotes back


def shown(value: str, limit: int = SHOWN_MAX, *, quote: bool = True) -> str:
    """What the user typed, quoted back in an error: control and other unprintable characters escaped (a
    pasted escape sequence cannot repaint the terminal) and at most ``limit`` characters of it. Unquoted
    (``quote=False``) for a URL or a path that reads well as it is."""
    clipped = value[:limit]
    text = repr(clipped) if quote else repr(clipped)[1:-1]
    return text if len(value) <= limit else f"{text}... ({len(value)} characters)"


class CliError(click.ClickException):
    """A user-facing error: printed as `orz: <message>`, exit code 1 unless given another."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        # Messages quote what the server said (a session's failure reason, a receiver's answer), which may
        # carry a runner's escape sequences: the terminal gets them as U+FFFD (cli/output.py, printable).
        click.echo(f"orz: {scrub_controls(self.format_message(), 'text')}", err=True)


def exit_code_for(status: int) -> int:
    """The exit code for an API answer's HTTP status (422: what the user typed was refused, as click's bad value)."""
    return {401: EXIT_AUTH, 403: EXIT_FORBIDDEN, 404: EXIT_NOT_FOUND, 422: EXIT_USAGE}.get(status, EXIT_ERROR)


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more (a closed pipe's writer polls as an error),
    so a BrokenPipeError was about our output and not, say, a subprocess we feed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or no real stdout
        return False


class UnsavedWork(CliError):
    """`orz cloud kill` of a session whose workspace holds work the origin does not."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_UNSAVED_WORK)


def async_command(describe: Callable[[ApiError], str] = lambda exc: exc.detail,
                  tidy: Callable[[str], str] = lambda text: text,
                  ) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, T]]:
    """A decorator that runs an async command body and turns every known failure into a CliError:
    an API answer (``describe`` says it; its exit code by HTTP status), our typed errors, and OS errors."""

    def decorate(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            try:
                return asyncio.run(fn(*args, **kwargs))
            except ApiError as exc:
                raise CliError(tidy(describe(exc)), exit_code_for(exc.status)) from None
            except OrzError as exc:
                raise CliError(tidy(exc.detail)) from None
            except BrokenPipeError as exc:
                if stdout_reader_gone():
                    # `orz cloud list | head -1`: the reader stopped reading. click's own handler exits 1
                    # without a word, as other command line tools do; "[Errno 32] Broken pipe" is noise.
                    raise
                raise CliError(tidy(str(exc))) from None
            except (SchemaNotAtHead, OSError) as exc:
                raise CliError(tidy(str(exc))) from None

        return wrapper

    return decorate


# The operator's commands (orz admin, orz server): messages as the API and the database give them.
run_async = async_command()
