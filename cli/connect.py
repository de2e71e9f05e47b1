"""The logged-in API client for `orz cloud`, and API failures as one readable line each."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import click
import httpx

from api.client import ApiClient, ApiError, ApiUnreachable
from cli.config import DEFAULT_API_URL, Credentials, api_url_problem, load_credentials
from cli.errors import EXIT_AUTH, EXIT_USAGE, CliError, async_command
from cli.login import REFRESH_MARGIN_S, refreshed

P = ParamSpec("P")
T = TypeVar("T")

LOGIN_HINT = "run orz cloud login"
TOKEN_ENV = "ORZBOB_TOKEN"  # noqa: S105  # nosec B105  # a variable name, not a secret


def env_token() -> str | None:
    """ORZBOB_TOKEN: a token for this command only (CI, scripts), ahead of the saved login."""
    return os.environ.get(TOKEN_ENV, "").strip() or None


def check_api_url(url: str, where: str) -> str:
    """``url`` without a trailing slash; a usage error naming ``where`` it came from when it is no API URL."""
    problem = api_url_problem(url)
    if problem:
        raise CliError(f"{where} {url} {problem}", EXIT_USAGE)
    return url.rstrip("/")


def require_credentials() -> Credentials:
    token = env_token()
    try:
        creds = load_credentials()
    except ValueError as exc:
        if token is None:
            raise CliError(f"{exc}; {LOGIN_HINT}", EXIT_AUTH) from None
        creds = None
    env_url = os.environ.get("ORZBOB_API_URL")
    if env_url:
        check_api_url(env_url, "ORZBOB_API_URL")
    if token is not None:
        url = env_url or (creds.api_url if creds else DEFAULT_API_URL)
        return Credentials(api_url=url.rstrip("/"), api_token=token)
    if creds is None:
        raise CliError(f"not logged in; {LOGIN_HINT}", EXIT_AUTH)
    return creds


# An API that restarts (a rolling upgrade, `orz server` started again, a database failover) is waited
# for this long, with a line saying so, instead of failing the command on its first refusal.
API_RETRY_S = 10.0


def _say_retrying(why: str) -> None:
    click.echo(f"orz: {one_line(why)} (Ctrl-C stops)", err=True)


class CliApiClient(ApiClient):
    """The saved login's client: a sign-in token about to expire is refreshed before the next request."""

    def __init__(self, creds: Credentials) -> None:
        super().__init__(creds.api_url, creds.api_token, retry_for_s=API_RETRY_S, on_retry=_say_retrying)
        self.creds = creds

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None, content: bytes | None = None,
                      headers: dict[str, str] | None = None, wait_s: float | None = None) -> httpx.Response:
        if self.creds.refresh_token and self.creds.expires_within(REFRESH_MARGIN_S):
            try:
                self.creds = await refreshed(self.creds)
            except ApiError as exc:
                if isinstance(exc, ApiUnreachable) or exc.status >= 500:
                    raise
                why = exc.detail.split("; run orz cloud login")[0]  # said once, at the end
                raise CliError(f"your sign-in has expired and could not be renewed ({why}); "
                               "run orz cloud login", EXIT_AUTH) from None
            self._http.headers["Authorization"] = f"Bearer {self.creds.api_token}"
        return await super().request(method, path, json=json, params=params, content=content, headers=headers,
                                     wait_s=wait_s)


def client() -> ApiClient:
    return CliApiClient(require_credentials())


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def api_message(exc: ApiError) -> str:
    """What the user reads for an API failure."""
    if isinstance(exc, ApiUnreachable):
        return f"{exc.detail} (is the server running? the URL comes from ORZBOB_API_URL or orz cloud login)"
    if exc.status == 401:
        if env_token() is not None:
            return f"the API refused the token in {TOKEN_ENV} ({exc.detail}); check it, or unset it to use your login"
        return f"the API refused your token ({exc.detail}); {LOGIN_HINT}"
    body = exc.body
    if exc.status == 429 and "limit" in body and "current" in body:
        plan = f" on the {body['plan']} plan" if body.get("plan") else ""
        return (f"quota reached: {body['current']} of {body['limit']} active sessions{plan}; "
                "stop or kill one first (orz cloud list)")
    return exc.detail


NO_SUCH_SESSION = "no such session: "


async def _session_hint(session_id: str) -> str:
    """The next step after a mistyped session id: the closest of the user's sessions, else where to look."""
    import difflib

    with contextlib.suppress(ApiError, CliError, OSError):
        async with client() as api:
            ids = [inst.id for inst in (await api.list_instances()).instances]
        if not ids:
            return "you have no sessions; start one with: orz cloud new"
        close = difflib.get_close_matches(session_id, ids, n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]}? (orz cloud list shows your sessions)"
    return "orz cloud list shows your sessions"


def _with_next_steps(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except ApiError as exc:
            if exc.status == 404 and exc.detail.startswith(NO_SUCH_SESSION):
                exc.detail = f"{exc.detail}; {await _session_hint(exc.detail.removeprefix(NO_SUCH_SESSION))}"
            raise

    return wrapper


def cloud_command(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """`orz cloud`: an API failure as the user should read it, on one line, with a next step where one is known."""
    return async_command(api_message, one_line)(_with_next_steps(fn))
