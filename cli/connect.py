"""The logged-in API client for `orz cloud`, and API failures as one readable line each."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from api.client import ApiClient, ApiError, ApiUnreachable
from cli.config import Credentials, load_credentials
from cli.errors import CliError

P = ParamSpec("P")
T = TypeVar("T")

LOGIN_HINT = "run orz cloud login --token <token>"


def require_credentials() -> Credentials:
    try:
        creds = load_credentials()
    except ValueError as exc:
        raise CliError(f"{exc}; {LOGIN_HINT}") from None
    if creds is None:
        raise CliError(f"not logged in; {LOGIN_HINT}")
    return creds


def client() -> ApiClient:
    creds = require_credentials()
    return ApiClient(creds.api_url, creds.api_token)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def api_message(exc: ApiError) -> str:
    """What the user reads for an API failure."""
    if isinstance(exc, ApiUnreachable):
        return f"{exc.detail} (is the server running? the URL comes from ORZBOB_API_URL or orz cloud login)"
    if exc.status == 401:
        return f"the API refused your token ({exc.detail}); {LOGIN_HINT}"
    body = exc.body
    if exc.status == 429 and "limit" in body and "current" in body:
        plan = f" on the {body['plan']} plan" if body.get("plan") else ""
        return (f"quota reached: {body['current']} of {body['limit']} active sessions{plan}; "
                "stop or kill one first (orz cloud list)")
    return exc.detail


def cloud_command(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Run an async `orz cloud` command body; every known failure becomes `orz: <one line>`, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except ApiError as exc:
            raise CliError(one_line(api_message(exc))) from None
        except OSError as exc:
            raise CliError(one_line(str(exc))) from None

    return wrapper
