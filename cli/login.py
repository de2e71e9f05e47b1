"""Logging in: pluggable flows that end with an API token saved in the token file.

Only the API-token flow exists today; a device-code or OIDC flow implements `LoginFlow` and is added
to `FLOWS`, and `orz cloud login` picks it with `--method`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from api import schemas
from api.client import ApiClient
from cli.config import Credentials, save_credentials
from cli.errors import CliError


class LoginFlow(Protocol):
    name: ClassVar[str]

    async def obtain_token(self, api_url: str) -> str:
        """Return an API token for api_url (prompting, polling or opening a browser as needed)."""
        ...


class TokenLogin:
    """The user already has a token (from `orz admin create-token` or the web console)."""

    name: ClassVar[str] = "token"

    def __init__(self, token: str | None) -> None:
        self.token = token

    async def obtain_token(self, api_url: str) -> str:
        if not self.token:
            raise CliError("orz cloud login needs --token <token> (ask your admin: orz admin create-token)")
        return self.token.strip()


FLOWS: dict[str, type] = {TokenLogin.name: TokenLogin}


async def login(flow: LoginFlow, api_url: str) -> tuple[Credentials, schemas.Me]:
    """Run the flow, check the token against /v1/me, and only then save it."""
    token = await flow.obtain_token(api_url)
    async with ApiClient(api_url, token) as client:
        me = await client.me()
    creds = Credentials(api_url=api_url.rstrip("/"), api_token=token)
    save_credentials(creds)
    return creds, me
