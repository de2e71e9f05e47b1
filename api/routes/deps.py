"""What a handler needs from the request: the app's services and the authenticated caller."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sanic import Request

from api import log as orz_log
from api.auth import Principal, authenticate_api_token, bearer_token, check_service_token
from api.errors import NotReady
from api.gateway_keys import gateway_host_public_key

if TYPE_CHECKING:
    from api.app import AppState


def state(request: Request) -> AppState:
    st: AppState | None = request.app.ctx.state
    if st is None:  # still waiting for the database schema (api/app.py)
        raise NotReady("the API is starting; try again in a moment",
                       internal=f"not ready: {getattr(request.app.ctx, 'schema_problem', None)}")
    return st


async def principal(request: Request) -> Principal:
    st = state(request)
    who = await authenticate_api_token(st.autocommit or st.sessions, bearer_token(request.headers.get("authorization")),
                                       st.principals)
    request.ctx.user_id = who.user_id
    orz_log.bind(user_id=who.user_id)  # every later line of this request names the caller
    return who


def require_service(request: Request) -> None:
    check_service_token(
        state(request).settings.service_token.get_secret_value(),
        bearer_token(request.headers.get("authorization")),
    )
    # The gateway: the API's per-address connection cap (api/serve.py) must not take it for one client.
    get_protocol = getattr(request.transport, "get_protocol", None)
    release = getattr(get_protocol(), "service_caller", None) if get_protocol else None
    if release is not None:
        release()


def gateway_host_keys(request: Request) -> list[str]:
    """The gateway's host key as OpenSSH lines, for clients to pin; read until found (`orz server`'s gateway
    may write it after the API started), then kept for the app's life."""
    line: str = getattr(request.app.ctx, "gateway_host_key", "")
    if not line:
        line = gateway_host_public_key(state(request).settings)
        request.app.ctx.gateway_host_key = line
    return [line] if line else []
