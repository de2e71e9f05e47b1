"""Typed async HTTP client for the Orzbob Cloud API, used by the CLI, the gateway and the runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from api import schemas

M = TypeVar("M", bound=BaseModel)

DEFAULT_TIMEOUT_S = 30.0
# A delete without force stops a live session and waits for its runner's final work report (the server's
# stop grace, then ORZ_DELETE_WORK_WAIT_S): longer than other requests, and not to be cut and retried.
DELETE_TIMEOUT_S = 120.0
# Methods a second try cannot do twice (a POST is never tried again: it may have been done).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Answers of an API (or the proxy before it) that is restarting or briefly without its database.
UNAVAILABLE = frozenset({502, 503, 504})
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 2.0


class ApiError(Exception):
    """A problem+json answer (or a transport failure) with the one line to show the user."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}


class ApiUnreachable(ApiError):
    def __init__(self, url: str, cause: Exception) -> None:
        super().__init__(0, "unreachable", f"cannot reach the Orzbob Cloud API at {url}: {cause}")



def _segment(value: str) -> str:
    """One path segment: a `/` or `?` in an id the user typed must not reach another route."""
    return quote(value, safe="")


class ApiClient:
    """One client per base URL and bearer token (API token, service token or runner token)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_for_s: float = 0.0,
        on_retry: Callable[[str], None] | None = None,
        local_address: str | None = None,
    ) -> None:
        """``retry_for_s`` > 0: an idempotent request that an API answers with 502/503/504, or whose
        connection dies under it, is tried again for that long (a rolling restart, a database failover);
        ``on_retry`` hears why, once per request. ``local_address``: the address connections come from."""
        if local_address is not None and transport is None:
            transport = httpx.AsyncHTTPTransport(local_address=local_address)
        self.base_url = base_url.rstrip("/")
        self.retry_for_s = retry_for_s
        self.on_retry = on_retry
        headers = {"Accept": "application/json", "User-Agent": "orzbob-cloud"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None, content: bytes | None = None,
                      headers: dict[str, str] | None = None, wait_s: float | None = None) -> httpx.Response:
        deadline = time.monotonic() + self.retry_for_s
        pause = RETRY_FIRST_S
        told = False
        while True:
            try:
                response = await self._http.request(
                    method, path, json=json, params=params, content=content, headers=headers,
                    timeout=httpx.USE_CLIENT_DEFAULT if wait_s is None else wait_s)
            except httpx.TransportError as exc:
                # A refused connect means no server (say so at once: it is seldom a restart, which a load
                # balancer answers with 502/503); a connection that died under a request is tried again.
                again = method in IDEMPOTENT and not isinstance(exc, httpx.ConnectError)
                error: ApiError = ApiUnreachable(self.base_url, exc)
                cause: Exception | None = exc
                wait = pause
            else:
                if response.status_code < 400:
                    return response
                error = _error_from(response)
                cause = None
                again = response.status_code in UNAVAILABLE and method in IDEMPOTENT
                wait = max(pause, _retry_after(response))
            left = deadline - time.monotonic()
            if not again or left <= 0:
                raise error from cause
            if self.on_retry is not None and not told:
                self.on_retry(f"{error.detail}; trying again for up to {left:.0f} s")
                told = True
            await asyncio.sleep(min(wait, left))
            pause = min(pause * 2, RETRY_MAX_S)

    async def _get(self, model: type[M], path: str, params: dict[str, Any] | None = None) -> M:
        return model.model_validate((await self.request("GET", path, params=params)).json())

    async def _send(self, model: type[M], method: str, path: str, body: BaseModel | None = None) -> M:
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        return model.model_validate((await self.request(method, path, json=payload)).json())

    # -- public API ------------------------------------------------------------------------------

    async def me(self) -> schemas.Me:
        return await self._get(schemas.Me, "/v1/me")

    async def create_instance(self, body: schemas.InstanceCreate) -> schemas.Instance:
        return await self._send(schemas.Instance, "POST", "/v1/instances", body)

    async def list_instances(self) -> schemas.InstanceList:
        return await self._get(schemas.InstanceList, "/v1/instances")

    async def get_instance(self, session_id: str) -> schemas.Instance:
        return await self._get(schemas.Instance, f"/v1/instances/{_segment(session_id)}")

    async def instance_status(self, session_id: str) -> schemas.InstanceStatus:
        return await self._get(schemas.InstanceStatus, f"/v1/instances/{_segment(session_id)}/status")

    async def delete_instance(self, session_id: str, *, force: bool = False) -> schemas.Instance:
        """Refused (409 ``unsaved_work``) while the session holds unsaved work, unless ``force``."""
        params = {"force": "true"} if force else None
        response = await self.request("DELETE", f"/v1/instances/{_segment(session_id)}", params=params,
                                      wait_s=max(DELETE_TIMEOUT_S, self._http.timeout.read or 0))
        return schemas.Instance.model_validate(response.json())

    async def stop_instance(self, session_id: str) -> schemas.Instance:
        return await self._send(schemas.Instance, "POST", f"/v1/instances/{_segment(session_id)}/stop")

    async def start_instance(self, session_id: str, *, pull: bool = False) -> schemas.Instance:
        body = schemas.StartRequest(pull=True) if pull else None
        return await self._send(schemas.Instance, "POST", f"/v1/instances/{_segment(session_id)}/start", body)

    async def attach(self, session_id: str, body: schemas.AttachRequest) -> schemas.AttachGrant:
        return await self._send(schemas.AttachGrant, "POST", f"/v1/instances/{_segment(session_id)}/attach", body)

    async def logs(self, session_id: str) -> schemas.InstanceLogs:
        return await self._get(schemas.InstanceLogs, f"/v1/instances/{_segment(session_id)}/logs")

    async def recording(self, session_id: str, *, previous: bool = False) -> bytes:
        """The session's pane recording as asciicast v2 bytes (``previous``: the part rotated out)."""
        params = {"part": "previous"} if previous else None
        return (await self.request("GET", f"/v1/instances/{_segment(session_id)}/recording", params=params)).content

    async def create_secret(self, body: schemas.SecretCreate) -> schemas.Secret:
        return await self._send(schemas.Secret, "POST", "/v1/secrets", body)

    async def replace_secret(self, name: str, body: schemas.SecretReplace, scope: str) -> schemas.Secret:
        return await self._send(schemas.Secret, "PUT", f"/v1/secrets/{_segment(name)}?scope={scope}", body)

    async def list_secrets(self) -> schemas.SecretList:
        return await self._get(schemas.SecretList, "/v1/secrets")

    async def delete_secret(self, name: str) -> None:
        await self.request("DELETE", f"/v1/secrets/{_segment(name)}")

    async def create_webhook(self, body: schemas.WebhookCreate) -> schemas.WebhookCreated:
        return await self._send(schemas.WebhookCreated, "POST", "/v1/webhooks", body)

    async def list_webhooks(self) -> schemas.WebhookList:
        return await self._get(schemas.WebhookList, "/v1/webhooks")

    async def delete_webhook(self, webhook_id: str) -> None:
        await self.request("DELETE", f"/v1/webhooks/{_segment(webhook_id)}")

    async def test_webhook(self, webhook_id: str) -> schemas.WebhookDelivery:
        return await self._send(schemas.WebhookDelivery, "POST", f"/v1/webhooks/{_segment(webhook_id)}/test")

    async def webhook_deliveries(self, webhook_id: str, limit: int = 20) -> schemas.WebhookDeliveryList:
        return await self._get(schemas.WebhookDeliveryList, f"/v1/webhooks/{_segment(webhook_id)}/deliveries",
                               params={"limit": limit})

    async def create_api_token(self, body: schemas.ApiTokenCreate) -> schemas.ApiTokenCreated:
        return await self._send(schemas.ApiTokenCreated, "POST", "/v1/tokens", body)

    async def list_api_tokens(self) -> schemas.ApiTokenList:
        return await self._get(schemas.ApiTokenList, "/v1/tokens")

    async def revoke_api_token(self, token_id: str) -> None:
        await self.request("DELETE", f"/v1/tokens/{_segment(token_id)}")

    # -- sign-in ---------------------------------------------------------------------------------

    async def sign_in_providers(self) -> schemas.SignInProviders:
        return await self._get(schemas.SignInProviders, "/v1/auth/providers")

    async def start_device(self, provider: str | None = None) -> schemas.DeviceAuthorization:
        body = schemas.DeviceAuthorizationRequest(provider=provider)  # type: ignore[arg-type]
        return await self._send(schemas.DeviceAuthorization, "POST", "/v1/auth/device", body)

    async def poll_device(self, device_code: str) -> schemas.TokenGrant:
        body = schemas.TokenRequest(grant_type="urn:ietf:params:oauth:grant-type:device_code", device_code=device_code)
        return await self._send(schemas.TokenGrant, "POST", "/v1/auth/token", body)

    async def refresh(self, refresh_token: str) -> schemas.TokenGrant:
        body = schemas.TokenRequest(grant_type="refresh_token", refresh_token=refresh_token)
        return await self._send(schemas.TokenGrant, "POST", "/v1/auth/token", body)

    async def revoke(self) -> None:
        await self.request("POST", "/v1/auth/revoke")

    # -- internal API (runner and gateway) -------------------------------------------------------

    async def heartbeat(self, session_id: str, body: schemas.Heartbeat) -> schemas.HeartbeatReply:
        return await self._send(
            schemas.HeartbeatReply, "POST", f"/internal/v1/instances/{_segment(session_id)}/heartbeat", body
        )

    async def upload_recording(self, session_id: str, part: str, offset: int, data: bytes) -> schemas.RecordingAck:
        """Append ``data`` at ``offset`` of the recording's part ``part``; a 409's body says where it ends."""
        response = await self.request(
            "POST", f"/internal/v1/instances/{_segment(session_id)}/recording", params={"part": part, "offset": offset},
            content=data, headers={"Content-Type": "application/octet-stream"})
        return schemas.RecordingAck.model_validate(response.json())

    async def authorize(self, body: schemas.AuthorizeRequest) -> schemas.AuthorizeReply:
        return await self._send(schemas.AuthorizeReply, "POST", "/internal/v1/authorize", body)

    async def check_access(self, body: schemas.AccessCheck) -> schemas.AccessCheckReply:
        return await self._send(schemas.AccessCheckReply, "POST", "/internal/v1/access-check", body)

    async def report_auth_failure(self, body: schemas.AuthFailureIn) -> schemas.AuthFailureReply:
        return await self._send(schemas.AuthFailureReply, "POST", "/internal/v1/auth-failures", body)

    async def browser_signin_start(self, redirect_uri: str, *, provider: schemas.SignInProviderName | None = None,
                                   source_address: str | None = None,
                                   page_nonce: str | None = None) -> schemas.BrowserSignInRedirect:
        body = schemas.BrowserSignInStart(redirect_uri=redirect_uri, provider=provider, source_address=source_address,
                                          page_nonce=page_nonce)
        return await self._send(schemas.BrowserSignInRedirect, "POST", "/internal/v1/signin/start", body)

    async def browser_signin_finish(self, state: str, code: str, redirect_uri: str, *,
                                    source_address: str | None = None) -> schemas.BrowserSignInGrant:
        body = schemas.BrowserSignInFinish(state=state, code=code, redirect_uri=redirect_uri,
                                           source_address=source_address)
        return await self._send(schemas.BrowserSignInGrant, "POST", "/internal/v1/signin/finish", body)

    async def attach_event(self, body: schemas.AttachEventIn) -> None:
        await self.request("POST", "/internal/v1/attach-events", json=body.model_dump(mode="json"))


def _retry_after(response: httpx.Response) -> float:
    """The answer's Retry-After in seconds (0 when absent or an HTTP date, which the API never sends)."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0


def _error_from(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = schemas.problem_detail(body) if body else f"HTTP {response.status_code}"
    return ApiError(response.status_code, str(body.get("code", "http_error")), detail, body)
