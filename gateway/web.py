"""The web door: browser terminal page, WebSocket attach, and SSH over WebSocket, beside the SSH listener.

Every check happens in ``process_request``, before the upgrade, so a bad credential is a plain HTTP
status (401 missing/invalid/expired/replayed token, 403 another session's token or a foreign Origin)
and the single-use ``jti`` is spent by the API's authorize call before any byte of the session flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt as pyjwt
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.http11 import Request, Response

from api.addresses import Network, within
from api.client import ApiClient, ApiError, ApiUnreachable
from api.log import without_credentials
from api.schemas import RECORDING_CONTENT_TYPE, AttachRequest, AuthorizeReply
from gateway import auth, drain, metrics, web_bridge
from gateway import web_http as http
from gateway.errors import AttachRefused, CredentialRejected, CredentialsUnavailable
from gateway.preauth import PreauthLimiter
from gateway.web_signin import BrowserSignIn, cookie_token

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)
# websockets logs request lines at DEBUG, query string (and so the token) included: keep it at INFO.
ws_log = logging.getLogger("gateway.web.ws")
ws_log.setLevel(logging.INFO)

# API refusal codes as HTTP statuses before the upgrade.
# The API's refusals a retry will not change (not yours, gone, failed, the plan's quota): 401 stays a
# handshake status like the door's own token checks, 503 is worth the page's retry.
FINAL_REFUSALS = (403, 404, 409, 429)
REFUSAL_STATUS = {"unauthorized": 401, "forbidden": 403, "not_found": 404, "quota_exceeded": 429,
                  "unavailable": 503, "session_failed": 409, "not_running": 409}
MAX_FRAME = 1 << 20


@dataclass
class Grant:
    """What process_request established for one upgraded connection."""

    kind: str  # "attach" | "ssh"
    session_id: str
    principal: auth.AttachCredential
    reply: AuthorizeReply
    source: str
    id: str
    cols: int = 80
    rows: int = 24


BUSY = {  # what a connection beyond a pre-request limit reads before the door closes it
    "source": (429, "orz: too many unfinished requests from your address; try again shortly"),
    "total": (503, "orz: Orzbob Cloud is busy right now; try again shortly"),
}


def admitted_connections(limiter: PreauthLimiter, trusted: tuple[Network, ...]) -> type[ServerConnection]:
    """ServerConnection counted against ``limiter`` from accept until its request is answered (or it goes).

    A request may take the whole open_timeout (10 s) to arrive: without a count, one address opening
    connections that never finish a request holds as many of the door's sockets as it likes. Beyond a
    limit a connection gets one HTTP answer and is closed, as the SSH door's (gateway/preauth.py). A
    trusted proxy's connections count towards the total only: its clients' addresses are in headers not
    read yet, and one address for all of them would shut everyone out together."""

    class Admitted(ServerConnection):
        _counted: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            source = str(peer[0]) if peer else "?"
            key = f"{source}#{id(self)}" if within(source, trusted) else source  # a proxy: the total only
            verdict = limiter.admit(key)
            if verdict == "ok":
                self._counted = key
                return
            metrics.preauth_refused(verdict)
            log.info("web connection from %s refused: too many unfinished requests (%s limit)", source, verdict)
            status, line = BUSY[verdict]
            refusal = http.text(status, line)
            head = f"HTTP/1.1 {refusal.status_code} {refusal.reason_phrase}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in refusal.headers.raw_items())
            with contextlib.suppress(OSError, RuntimeError):
                transport.write(head.encode() + b"\r\n" + refusal.body)  # type: ignore[attr-defined]
            transport.close()

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            finally:
                self._release()  # answered (or upgraded): the request is no longer unfinished

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            super().connection_lost(exc)

        def _release(self) -> None:
            if self._counted is not None:
                limiter.release(self._counted)
                self._counted = None

    return Admitted


class WebDoor:
    """The HTTP/WebSocket listener of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings = gateway.settings
        self.origins = http.configured_origins(self.settings.public_web_url)
        self.trusted_proxies = self.settings.web_trusted_proxies()
        self.signin = BrowserSignIn(gateway.api, self.settings.web_base_url(), self.settings.internal_api_url)
        # The pages' "Sign in with ..." links: from the settings the API decides by too (in the Helm chart the
        # sign-in settings reach every component through config.extraEnv).
        self.signin_providers = self.settings.signin_providers()
        # Weak: a handshake that fails after process_request never reaches the handler to pop its grant.
        self._grants: weakref.WeakKeyDictionary[ServerConnection, Grant] = weakref.WeakKeyDictionary()
        self._refusals: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await ws_serve(
            self._handle, self.settings.gateway_web_host, self.settings.gateway_web_port,
            process_request=self._process_request, server_header="OrzbobCloud", compression=None,
            select_subprotocol=web_bridge.select_subprotocol,
            max_size=MAX_FRAME, logger=ws_log, create_connection=admitted_connections(
                PreauthLimiter(self.settings.gateway_preauth_per_source, self.settings.gateway_preauth_total),
                self.trusted_proxies),
        )
        log.info("gateway web door listening on %s:%d", self.settings.gateway_web_host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- before the upgrade ---------------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        peer = str(conn.remote_address[0]) if conn.remote_address else "?"
        source = http.client_address(peer, request.headers.get("X-Forwarded-For"), self.trusted_proxies)
        target = http.parse_target(request.path)
        if target is None:
            return http.text(404, "not found")
        if target.kind == "health":
            return http.text(200, "ok")
        if target.kind == "ready":
            problem = self.gw.readiness()
            return http.text(200, "ok") if problem is None else http.text(503, f"not ready: {problem}")
        if target.kind == "static":
            return http.static_file(target.arg)
        if self.gw.draining:  # shutting down: the Service sends new users to another replica
            return http.text(503, drain.web_refusal())
        # A top-level navigation (to the provider and back), protected by the state cookie, not Origin.
        if target.kind == "login":
            return await self.signin.login(request, target.query, source)
        if target.kind == "callback":
            return await self.signin.callback(request, target.query, source)
        if not http.origin_allowed(request, self.origins):
            log.info("web %s from %s refused: origin not allowed", http.loggable_path(request.path), source)
            return http.text(403, "origin not allowed")
        if target.kind == "page":
            return self.signin.forget_legacy(request, http.terminal_page(target.arg, signin=self.signin_providers))
        if target.kind == "token":
            return await self._mint_token(request, target, source)
        if target.kind == "replay":
            return self.signin.forget_legacy(
                request, http.terminal_page(target.arg, "replay.html", signin=self.signin_providers))
        if target.kind == "recording":
            return await self._recording(request, target, source)
        if target.kind == "forget":
            if self.gw.limiter.blocked(source):
                return http.json_response(429, {"detail": "too many failed attempts from your address"})
            response, refused = await self.signin.forget(request, target.key, source)
            if refused:  # guessing API tokens through the door counts like a bad attach token
                self.gw.limiter.record_failure(source)
            return response
        if not http.is_upgrade(request):
            return http.text(426, "this URL takes a WebSocket")
        try:
            grant = await self._authenticate(target, source)
        except _Refusal as exc:
            log.info("web %s from %s refused: %d %s", http.loggable_path(request.path), source,
                     exc.status, exc.line)
            if exc.by_api and exc.status in FINAL_REFUSALS and target.kind == "attach" and _offers_control(request):
                # A browser cannot read the body of a refused handshake: the page saw "connection lost"
                # and retried forever (a plan at its quota, a session it may not open). Its token checked
                # out, so it gets the upgrade and the API's reason as the page's error, then 4001.
                self._refusals[conn] = exc.line
                return None
            return http.text(exc.status, f"orz: {exc.line}")
        self._grants[conn] = grant
        return None

    async def _authenticate(self, target: http.Target, source: str) -> Grant:
        if self.gw.limiter.blocked(source):
            metrics.auth_failed("websocket", "rate_limited")
            raise _Refusal(429, "too many failed authentications from your address; try again later")
        token = target.query.get("token", "")
        if not token:
            raise _Refusal(401, "an attach token is required (?token=...)")
        try:
            principal = auth.check_jwt(token, _claimed_session(token), self.gw.anchors)
        except CredentialsUnavailable as exc:
            metrics.attach_failed("web", exc.code)
            raise _Refusal(503, exc.line) from None
        except CredentialRejected as exc:
            self.gw.limiter.record_failure(source)
            metrics.auth_failed("websocket", metrics.credential_reason(exc.line))
            raise _Refusal(401, exc.line) from None
        if _claimed_session(token) != target.arg:
            self.gw.limiter.record_failure(source)
            metrics.auth_failed("websocket", "wrong_session")
            raise _Refusal(403, f"attach token is not for session {target.arg}")
        principal = dataclasses.replace(principal, method="websocket")
        try:
            reply = await self.gw.router.authorize(target.arg, principal, source=source)
        except AttachRefused as exc:
            if target.kind != "ssh":  # a tunnel's own SSH attach is counted by the SSH door
                metrics.attach_failed("web", exc.code)
            status = REFUSAL_STATUS.get(exc.code, 409)
            if exc.counts_against_source:
                self.gw.limiter.record_failure(source)
            raise _Refusal(status, exc.line, by_api=True) from None
        return Grant(target.kind, target.arg, principal, reply, source, secrets.token_hex(6),
                     cols=_dimension(target.query.get("cols"), 80), rows=_dimension(target.query.get("rows"), 24))

    async def _mint_token(self, request: Request, target: http.Target, source: str) -> Response:
        """Same-origin token endpoint for the page: the user's API token in, a fresh attach token out.

        The page sends its API token in the Authorization header (never a cookie), so another site cannot
        make a browser call this; the gateway forwards it to the API's attach route and keeps nothing.
        """
        if self.gw.limiter.blocked(source):
            return http.json_response(429, {"detail": "too many failed attempts from your address"})
        token = _forwarded_token(request, target.key)
        if token is None:
            return http.json_response(401, {"detail": "an API token is required", "signin": "/s/login"})
        readonly = target.query.get("readonly", "") in ("1", "true")
        api = ApiClient(self.settings.internal_api_url, token)
        try:
            grant = await api.attach(target.arg, AttachRequest(readonly=readonly))
        except ApiUnreachable:
            return http.json_response(503, {"detail": "Orzbob Cloud is unavailable right now"})
        except ApiError as exc:
            log.info("web token for %s from %s refused: %d %s", without_credentials(target.arg), source, exc.status,
                     exc.code)
            if exc.status == 401:  # guessing API tokens through the door counts like a bad attach token
                self.gw.limiter.record_failure(source)
            status, detail = http.api_refusal(exc.status, exc.code, exc.detail)
            return http.json_response(status, {"detail": detail})
        finally:
            await api.aclose()
        return http.json_response(200, {"token": grant.token, "status": grant.status,
                                        "expires_at": grant.token_expires_at.isoformat(),
                                        "readonly": grant.readonly})

    async def _recording(self, request: Request, target: http.Target, source: str) -> Response:
        """Same-origin recording endpoint for the replay page: the API's recording, with the user's API token
        forwarded exactly as for ``/s/<id>/token`` (the gateway keeps nothing)."""
        if self.gw.limiter.blocked(source):
            return http.json_response(429, {"detail": "too many failed attempts from your address"})
        token = _forwarded_token(request, target.key)
        if token is None:
            return http.json_response(401, {"detail": "an API token is required", "signin": "/s/login"})
        previous = target.query.get("part", "") == "previous"
        api = ApiClient(self.settings.internal_api_url, token)
        try:
            data = await api.recording(target.arg, previous=previous)
        except ApiUnreachable:
            return http.json_response(503, {"detail": "Orzbob Cloud is unavailable right now"})
        except ApiError as exc:
            log.info("web recording of %s from %s refused: %d %s", without_credentials(target.arg), source, exc.status,
                     exc.code)
            if exc.status == 401:
                self.gw.limiter.record_failure(source)
            status, detail = http.api_refusal(exc.status, exc.code, exc.detail)
            return http.json_response(status, {"detail": detail})
        finally:
            await api.aclose()
        return http.response(200, data, RECORDING_CONTENT_TYPE, {"Cache-Control": "private, no-store"})

    # -- after the upgrade ----------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        refusal = self._refusals.pop(ws, None)
        if refusal is not None:
            await web_bridge.refuse(ws, refusal, control=web_bridge.wants_control(ws))
            return
        grant = self._grants.pop(ws, None)
        if grant is None:  # process_request always sets it before an upgrade
            await ws.close(1008, "not authorized")
            return
        if grant.kind == "ssh":
            await web_bridge.tunnel(self.gw, ws, grant)
        else:
            await web_bridge.terminal(self.gw, ws, grant)


class _Refusal(Exception):
    """``by_api``: the API's authorize refused (the token itself was good), not the door's own checks."""

    def __init__(self, status: int, line: str, *, by_api: bool = False) -> None:
        super().__init__(line)
        self.status = status
        self.line = line
        self.by_api = by_api


def _offers_control(request: Request) -> bool:
    """Whether the client asks for the page's subprotocol (only the browser page does)."""
    offered = request.headers.get_all("Sec-WebSocket-Protocol")
    return any(web_bridge.CONTROL_PROTOCOL in (p.strip() for p in value.split(",")) for value in offered)


def _forwarded_token(request: Request, key: str) -> str | None:
    """The API token the page sends (Authorization header, or the sign-in's cookie on its keyed path)."""
    header = request.headers.get("Authorization", "")
    if not header and key and (signed_in := cookie_token(request, key)) is not None:
        header = f"Bearer {signed_in}"
    if not header.startswith("Bearer ") or len(header) > 512 or not header.isascii() or not header.isprintable():
        return None  # not a token of ours (bytes that are not text could not even be sent on to the API)
    return header.removeprefix("Bearer ").strip()


def _claimed_session(token: str) -> str:
    """The sid claim, unverified: only to pick the session check_jwt then verifies it against."""
    try:
        claims = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return ""
    sid = claims.get("sid") if isinstance(claims, dict) else None
    return sid if isinstance(sid, str) and auth.valid_session_id(sid) else ""


def _dimension(value: str | None, default: int) -> int:
    try:
        n = int(value or default)
    except ValueError:
        return default
    return max(2, min(n, 1000))
