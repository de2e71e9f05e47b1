"""Logging in: pluggable flows that end with an API token saved in the token file.

`TokenLogin` takes a token the user already has (--token, --with-token on stdin). `DeviceLogin` runs the
OAuth 2.0 device authorization grant (RFC 8628) through the API: the API talks to the identity provider,
the CLI shows the code, opens a browser where there is one, polls, and saves an API token with its expiry
and a refresh token. `refreshed` swaps an expired sign-in token for a new one without asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import webbrowser
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Protocol
from urllib.parse import urlsplit

import click

from api import schemas
from api.client import ApiClient, ApiError
from cli.config import Credentials, save_credentials
from cli.errors import EXIT_AUTH, CliError

# Refresh this long before the token's expiry, so a command does not start with a token about to lapse.
REFRESH_MARGIN_S = 60
SPINNER = "|/-\\"


@dataclass(frozen=True)
class Obtained:
    token: str
    expires_at: datetime | None = None
    refresh_token: str | None = None
    source: str | None = None


class LoginFlow(Protocol):
    name: ClassVar[str]

    async def obtain_token(self, api_url: str) -> Obtained:
        """Return an API token for api_url (prompting, polling or opening a browser as needed)."""
        ...


class TokenLogin:
    """The user already has a token (from `orz admin create-token` or the web console)."""

    name: ClassVar[str] = "token"

    def __init__(self, token: str | None) -> None:
        self.token = token

    async def obtain_token(self, api_url: str) -> Obtained:
        if not self.token or not self.token.strip():
            raise CliError("no token given (orz cloud login --with-token reads it from standard input)")
        return Obtained(self.token.strip())


def can_open_browser() -> bool:
    """A browser is only opened where one can show: BROWSER set, a display, or macOS/Windows."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def is_web_page(url: str) -> bool:
    """Whether the API's verification URL may go to the browser: http(s) only. The browser gets it as an
    argument, so one starting with '-' would be an option (Chromium's --renderer-cmd-prefix runs a
    command), and a file:// or other scheme opens whatever the desktop does with it."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and url.isprintable()


def _grant_expiry(grant: schemas.TokenGrant) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=grant.expires_in)


class DeviceLogin:
    """RFC 8628 through the API: show the code, open the browser, poll with the interval and slow_down."""

    name: ClassVar[str] = "device"

    def __init__(self, provider: str | None = None, *, open_browser: bool = True) -> None:
        self.provider = provider
        self.open_browser = open_browser

    async def obtain_token(self, api_url: str) -> Obtained:
        async with ApiClient(api_url) as api:
            start = await api.start_device(self.provider)
            url = start.verification_uri_complete or start.verification_uri
            click.echo(f"To sign in, open {start.verification_uri} and enter the code: {start.user_code}", err=True)
            if start.verification_uri_complete:
                click.echo(f"(or open {start.verification_uri_complete})", err=True)
            if self.open_browser and can_open_browser() and is_web_page(url):
                with contextlib.suppress(webbrowser.Error):
                    webbrowser.open(url)
            grant = await self._poll(api, start)
        return Obtained(grant.access_token, _grant_expiry(grant), grant.refresh_token, grant.source)

    async def _poll(self, api: ApiClient, start: schemas.DeviceAuthorization) -> schemas.TokenGrant:
        interval = max(1, start.interval)
        deadline = time.monotonic() + start.expires_in
        spin = sys.stderr.isatty()
        tick = 0
        while time.monotonic() < deadline:
            for _ in range(interval * 4):
                if spin:
                    click.echo(f"\r{SPINNER[tick % 4]} waiting for you to approve in the browser", nl=False, err=True)
                    tick += 1
                await asyncio.sleep(0.25)
            try:
                grant = await api.poll_device(start.device_code)
            except ApiError as exc:
                if exc.code == "authorization_pending":
                    continue
                if exc.code == "slow_down":
                    interval = int(exc.body.get("interval") or interval + 5)
                    continue
                if exc.code == "rate_limited":  # others at this address used up its sign-ins: wait, go on
                    await asyncio.sleep(min(float(exc.body.get("retry_after_s") or interval),
                                            max(0.0, deadline - time.monotonic())))
                    continue
                if spin:
                    click.echo("", err=True)
                if exc.status == 401:
                    # Not "the API refused your token; run orz cloud login": there is no token yet, and
                    # logging in again meets the same refusal (an id_token the API did not accept).
                    raise CliError(f"the sign-in was not accepted: {exc.detail}", EXIT_AUTH) from None
                raise
            if spin:
                click.echo("\r" + " " * 48 + "\r", nl=False, err=True)
            return grant
        raise CliError("the sign-in code expired before it was approved; run orz cloud login again")


async def login(flow: LoginFlow, api_url: str) -> tuple[Credentials, schemas.Me]:
    """Run the flow, check the token against /v1/me, and only then save it."""
    got = await flow.obtain_token(api_url)
    async with ApiClient(api_url, got.token) as client:
        me = await client.me()
    creds = Credentials(api_url=api_url.rstrip("/"), api_token=got.token, expires_at=got.expires_at,
                        refresh_token=got.refresh_token,
                        source=got.source or (me.source if me.source != "token" else None))
    save_credentials(creds)
    return creds, me


async def refreshed(creds: Credentials) -> Credentials:
    """The saved login, with an expired (or nearly expired) sign-in token swapped for a new one."""
    if not creds.refresh_token or not creds.expires_within(REFRESH_MARGIN_S):
        return creds
    async with ApiClient(creds.api_url) as api:
        grant = await api.refresh(creds.refresh_token)
    new = Credentials(api_url=creds.api_url, api_token=grant.access_token, expires_at=_grant_expiry(grant),
                      refresh_token=grant.refresh_token, source=grant.source)
    save_credentials(new)
    return new
