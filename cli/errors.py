"""Turn any failure into one readable line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import click

from api.client import ApiError
from api.errors import OrzError, SchemaNotAtHead

P = ParamSpec("P")
T = TypeVar("T")


class CliError(click.ClickException):
    """A user-facing error: printed as `orz: <message>`, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"orz: {self.format_message()}", err=True)


class UnsavedWork(CliError):
    """`orz cloud kill` of a session whose workspace holds work the origin does not: exit 3."""

    exit_code = 3


def run_async(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Run an async command body, mapping known errors to CliError."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except ApiError as exc:
            raise CliError(exc.detail) from None
        except OrzError as exc:
            raise CliError(exc.detail) from None
        except SchemaNotAtHead as exc:
            raise CliError(str(exc)) from None
        except OSError as exc:
            raise CliError(str(exc)) from None

    return wrapper
