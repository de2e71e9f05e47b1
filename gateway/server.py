"""The SSH front door: `ssh <session-id>@host` with a certificate or an attach JWT, bridged to the runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Literal

import asyncssh
from pydantic import SecretStr

from api.client import ApiClient
from api.metrics_http import MetricsServer
from api.public_keys import PublicKeyError
from api.schemas import AttachEventIn, AuthorizeReply
from api.settings import SSH_SIGNATURE_ALGS, Settings, ssh_algorithms
from gateway import auth, drain, idle, keepalive, keys, metrics
from gateway.agent import AgentRelay
from gateway.bridge import Attachment, BridgeSession, connect_upstream, pin_local_username
from gateway.cork import WithoutFiller
from gateway.errors import (
    ApiUnavailable,
    AttachRefused,
    CredentialRejected,
    CredentialsUnavailable,
    UpstreamUnavailable,
)
from gateway.forwarding import Pipe, open_direct, open_remote_listener
from gateway.preauth import AdmittedProtocol, AttachSlots, PreauthLimiter
from gateway.revocation import AccessWatch, Revocable
from gateway.routing import Router
from gateway.web import WebDoor
from gateway.web_bridge import LiveTerminal

log = logging.getLogger(__name__)

SIGNATURE_ALGS = frozenset(alg.encode() for alg in SSH_SIGNATURE_ALGS)
# After a refusal line was shown, give the client a moment to read it, then hang up.
REFUSED_LINGER_S = 5
# After a revocation closed the sessions, the connection itself goes this much later.
REVOKED_LINGER_S = 0.5
# At the end of a drain, between the line in the terminals and the disconnect (OpenSSH may drop output
# that arrives with the connection's end).
DRAIN_LAST_WORD_S = 0.5
# API answers to a channel's re-authorization that withdraw the whole connection, not just that channel.
WITHDRAWN_CODES = frozenset({"forbidden", "not_found", "unauthorized"})


def _runner_gone_reason(session_id: str) -> str:
    """The SSH disconnect message when the session's runner went away under a connection."""
    return (f"orz: session {session_id} ended this connection (stopped, killed or its runner restarted: "
            f"orz cloud status {session_id} says which); connecting again wakes a stopped session")


class ClientSideConnection(keepalive.OnOneTimer, WithoutFiller, asyncssh.SSHServerConnection):
    """The client side: asyncssh's server connection with a user's SSH client, plus our certificate checks
    (key id, principals, extensions). Its owner, a ClientHandler, does the rest."""

    shares_constants = True  # gateway.idle.share_constants

    async def validate_public_key(self, username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        owner = self.get_owner()
        assert isinstance(owner, ClientHandler)
        principal = owner.precheck_certificate(username, key_data)
        if principal is None:
            return False
        if msg and _signature_algorithm(signature) not in SIGNATURE_ALGS:
            # asyncssh's signature_algs only advertises (server-sig-algs); it would verify ssh-rsa (SHA-1).
            owner.failed(CredentialRejected("signature algorithm not accepted (SHA-1)"), "certificate")
            return False
        # asyncssh checks the CA (validate_ca_key), validity, principal and the client's signature.
        if not await super().validate_public_key(username, key_data, msg, signature):
            if msg:
                owner.failed(CredentialRejected("certificate signature not valid"), "certificate")
            return False
        if not msg:
            return True  # a query: the client signs next
        return await owner.authorize(username, principal)


def token_instruction(session_id: str) -> str:
    """What the keyboard-interactive prompt says: the command that prints a token for this session."""
    shown = session_id[:32] if auth.valid_session_id(session_id) else "<session-id>"
    return (f"Paste a one-time attach token from `orz cloud token {shown}` "
            f"(or let `orz cloud attach {shown}` sign you in with a certificate).")


def _signature_algorithm(signature: bytes) -> bytes:
    """The algorithm name an SSH signature blob starts with (RFC 4253 6.6); b"" if malformed."""
    try:
        return asyncssh.packet.SSHPacket(signature).get_string()
    except asyncssh.packet.PacketDecodeError:
        return b""


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Log lines of one client connection, each starting with its id and source address."""

    def __init__(self, logger: logging.Logger, conn: ClientHandler) -> None:
        super().__init__(logger, {})
        self.conn = conn

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"conn {self.conn.id} from {self.conn.source}: {msg}", kwargs


class ClientHandler(asyncssh.SSHServer):
    """asyncssh's callbacks for one ClientSideConnection: authentication, then the bridge to its session's
    runner (over a RunnerSideConnection, gateway/cork.py)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self.id = secrets.token_hex(6)
        self.session_id = ""
        self.principal: auth.AttachCredential | None = None
        # The API's reply, until attached (the route to wake and reach the session); then only its mode stays
        # ("rw" / "ro": a pydantic reply and its route are ~1 KB for the life of an idle attached session).
        self.reply: AuthorizeReply | None = None
        self.mode: str | None = None
        self.refusal: AttachRefused | None = None
        self.attachment: Attachment | None = None
        self.attached_at: float | None = None
        self.auth_done_at: float | None = None
        self.revoked: str | None = None  # why access was withdrawn while connected
        self.authorized_at: float | None = None  # monotonic time of the API's last yes to this connection
        self.slot_of: str | None = None  # the user whose attach slot (gateway.attach_slots) this connection holds
        self._banners: set[str] | None = None  # lines already shown (made on the first: most show none)
        self._unavailable_counted = False
        # Where the runner's agent requests land; relayed to the client's agent only if it asked (ssh -A).
        self.agent = AgentRelay(str(gateway.runtime_dir / f"agent-{self.id}"), self._client_agent_path)

    @property
    def log(self) -> ConnectionLog:
        """This connection's log lines (an adapter made when there is a line to write, not kept per connection)."""
        return ConnectionLog(log, self)

    @property
    def readonly(self) -> bool:
        return self.mode == "ro" or bool(self.principal and self.principal.readonly)

    # -- connection lifecycle ------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:  # type: ignore[override]
        self.conn = conn
        self.source = self.gw.source_of(conn.get_extra_info("peername"))
        self.gw.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.connections.discard(self)
        if self.slot_of is not None:
            self.gw.attach_slots.give(self.slot_of)
            self.slot_of = None
        self.agent.close()
        if self.attachment is not None:
            self.attachment.close()
        if self.attached_at is not None and self.principal is not None and self.attachment is not None:
            c = self.attachment.counters
            self.gw.spawn(self.gw.router.report(AttachEventIn(
                session_id=self.session_id, user_id=self.principal.user_id, event="detached",
                connection_id=self.id, source_address=self.source, bytes_in=c.bytes_in,
                bytes_out=c.bytes_out, duration_s=max(0.0, time.monotonic() - self.attached_at))))
            duration = max(0.0, time.monotonic() - self.attached_at)
            metrics.detached("ssh", c.bytes_in, c.bytes_out)
            self.log.info("detached from %s after %.1f s (in %d B, out %d B)", self.session_id,
                          duration, c.bytes_in, c.bytes_out,
                          extra={"event": "detached", "conn_id": self.id, "session_id": self.session_id,
                                 "user_id": self.principal.user_id, "source": self.source,
                                 "duration_s": round(duration, 3), "bytes_in": c.bytes_in,
                                 "bytes_out": c.bytes_out, "fast_path_packets": self._fast_path_packets()})

    def _fast_path_packets(self) -> int:
        """Packets this connection relayed on the fast path, both ways (0 means asyncssh carried all)."""
        upstream = self.attachment.upstream_now() if self.attachment is not None else None
        paths = (getattr(conn, "fast_path", None) for conn in (self.conn, upstream))
        return sum(path.relayed_packets for path in paths if path is not None)

    # -- authentication ------------------------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self.session_id = username
        if self.gw.limiter.blocked(self.source):
            # Refuse after the handshake so the client can show why (a raw close reads as garbage).
            self.log.info("refused: rate limited")
            metrics.auth_failed("any", "rate_limited")
            wait = self.gw.limiter.retry_after(self.source)
            self._banner(f"too many failed authentications from your address; try again in {wait} s")
            self._hang_up_now()
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # bare keys never: only certificates from the platform CA

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return key.public_data == self.gw.anchors.ca_key.public_data

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._check_token(username, password)

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> tuple[str, str, str, list]:
        return ("Orzbob Cloud", token_instruction(username), "", [("Token: ", False)])

    async def validate_kbdint_response(self, username: str, responses: list[str]) -> bool:
        return len(responses) == 1 and await self._check_token(username, responses[0])

    async def _check_token(self, username: str, token: str) -> bool:
        if self.gw.limiter.blocked(self.source):
            return False
        try:
            principal = auth.check_jwt(token, username, self.gw.anchors)
        except CredentialsUnavailable as exc:
            self.unavailable(exc)
            return False
        except CredentialRejected as exc:
            self.failed(exc, "jwt")
            return False
        return await self.authorize(username, principal)

    def precheck_certificate(self, username: str, key_data: bytes) -> auth.AttachCredential | None:
        """Our checks on an offered certificate; None for bare keys (ignored, not counted)."""
        if not auth.is_certificate(key_data):
            return None
        if self.gw.limiter.blocked(self.source):
            return None
        try:
            return auth.check_certificate(key_data, username, self.gw.anchors)
        except CredentialsUnavailable as exc:
            self.unavailable(exc)
            return None
        except CredentialRejected as exc:
            self.failed(exc, "certificate")
            return None

    async def authorize(self, username: str, principal: auth.AttachCredential) -> bool:
        """Ask the API; a refusal still completes auth so the client sees its one line (never a route)."""
        if not auth.valid_session_id(username):
            self.refusal = AttachRefused("no such session", code="not_found")
        else:
            try:
                self.reply = await self.gw.router.authorize(username, principal, source=self.source)
                self.mode = self.reply.mode
                self.authorized_at = time.monotonic()
            except AttachRefused as exc:
                self.log.info("attach to %s refused (%s)", username, exc.code)
                self.refusal = exc
        if self.refusal is None and self.slot_of is None:
            if self.gw.attach_slots.take(principal.user_id):
                self.slot_of = principal.user_id
            else:
                self.log.info("attach to %s refused: the user has %d connections open here", username,
                              self.gw.attach_slots.limit)
                self.refusal = AttachRefused(self.gw.attach_slots.refusal(), code="too_many_connections")
        if self.refusal is not None and self.refusal.counts_against_source and self._count_failure():
            self._banner("too many failed authentications; try again later")
        self.principal = principal
        return True

    def failed(self, exc: CredentialRejected, method: str) -> None:
        self.log.info("credential rejected: %s", exc.line)
        metrics.auth_failed(method, metrics.credential_reason(exc.line))
        again = "token" if method == "jwt" else "attach"
        self._banner(f"{exc.line}; get a new one with `orz cloud {again} {self.session_id[:32]}`")
        if self._count_failure():
            self._banner("too many failed authentications; try again later")
            self._hang_up_now()

    def _count_failure(self) -> bool:
        """Count a failed authentication here and, in the background, where every replica sees it."""
        self.gw.spawn(self.gw.share_failure(self.source))
        return self.gw.limiter.record_failure(self.source)

    def unavailable(self, exc: CredentialsUnavailable) -> None:
        """We cannot check any credential: a failed attach of ours (the SLO's), never held against the user."""
        if not self._unavailable_counted:
            self._unavailable_counted = True
            self.log.warning("attach to %s failed: %s", self.session_id, exc.internal)
            metrics.attach_failed("ssh", exc.code)
        self._banner(f"{exc.line}; try again in a moment")

    def _hang_up_now(self) -> None:
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "too many failed authentications")

    def _banner(self, line: str) -> None:
        if self._banners is None:
            self._banners = set()
        if line in self._banners or self.conn is None:
            return
        self._banners.add(line)
        with contextlib.suppress(OSError):  # auth already over
            self.conn.send_auth_banner(f"orz: {line}\r\n")

    def auth_completed(self) -> None:
        done = vars(self.conn).pop("preauth_done", None) if self.conn is not None else None
        if done is not None:
            done()  # authenticated: no longer counts against the pre-auth limits
        if self.conn is not None and self.gw.ssh_options is not None:
            idle.after_server_auth(self.conn, self.gw.ssh_options)  # its own copy of the options goes
        self.attachment = Attachment(reauthorize=self._reauthorize, agent_wanted=self.agent.start)
        self.auth_done_at = time.monotonic()
        if self.refusal is not None:
            metrics.attach_failed("ssh", self.refusal.code)
            self.attachment.refuse(self.refusal)
            asyncio.get_running_loop().call_later(REFUSED_LINGER_S, self._hang_up, self.refusal.line)
            return
        self.gw.spawn(self._attach())

    # -- while connected ---------------------------------------------------------------------------

    def live(self) -> tuple[str, str] | None:
        """(session id, user id) of an allowed attachment, for the gateway's access watch."""
        if self.principal is None or self.refusal is not None or self.revoked is not None:
            return None
        if self.attachment is None or self.conn is None or self.conn.is_closed():
            return None
        return self.session_id, self.principal.user_id

    async def _reauthorize(self) -> None:
        """Before any new channel: the API must still say yes (the user may be disabled since). An API that
        cannot answer (a restart) refuses nothing: its last yes stands for `gateway_reauth_grace_s`."""
        if self.revoked is not None:
            raise AttachRefused(self.revoked, code="revoked")
        assert self.principal is not None
        # Until this connection reached its runner, its channels wait for the attach (which waits for, and
        # wakes, a session that is stopping or stopped), so they ask as the attach does: a session the
        # reaper stopped meanwhile is woken, not refused. Once attached, a stopped session has closed the
        # runner connection this one rides on, so a channel asking then is refused rather than waking it.
        waiting = self.attached_at is None
        try:
            await self.gw.router.authorize(self.session_id, self.principal, source=self.source, first=False,
                                           wake=waiting)
        except ApiUnavailable as exc:
            age = self._authorization_age()
            if age is None or age >= self.gw.settings.gateway_reauth_grace_s:
                self.log.info("new channel to %s refused: the API did not answer (%s)", self.session_id,
                              exc.internal or exc.code)
                raise
            self.log.info("new channel to %s allowed without the API (%s): its last yes was %.0f s ago",
                          self.session_id, exc.internal or exc.code, age,
                          extra={"event": "reauth_grace", "conn_id": self.id, "session_id": self.session_id,
                                 "user_id": self.principal.user_id, "authorized_age_s": round(age, 3)})
            return
        except AttachRefused as exc:
            self.log.info("new channel to %s refused (%s)", self.session_id, exc.code)
            if exc.code in WITHDRAWN_CODES:
                self.revoke(exc.line)
            raise
        self.authorized_at = time.monotonic()

    def _authorization_age(self) -> float | None:
        """Seconds since the API last said yes to this connection; None if it never did."""
        return None if self.authorized_at is None else time.monotonic() - self.authorized_at

    def revoke(self, reason: str) -> None:
        """Access withdrawn: every open session shows the reason, then the connection closes."""
        if self.revoked is not None:
            return
        self.revoked = reason
        self.log.info("access to %s withdrawn: %s", self.session_id, reason)
        metrics.revoked("ssh")
        if self.attachment is not None:
            for session in list(self.attachment.sessions):
                session.revoke(reason)
        # The sessions' lines and exit statuses first; a ControlMaster relays them to its mux clients
        # only while its connection lives. New channels are refused meanwhile (self.revoked).
        asyncio.get_running_loop().call_later(REVOKED_LINGER_S, self._hang_up, reason)

    def draining(self) -> None:
        """The gateway is shutting down: attached terminals read why; a connection not yet attached
        (still authenticating or waiting for its session) goes now, with the reason, to come back elsewhere."""
        if self.attachment is None or self.attached_at is None:
            self.hang_up_restarting()
            return
        for session in list(self.attachment.sessions):
            session.notify(drain.terminal_notice(self.session_id))

    def drain_ending(self) -> None:
        """The drain is over: terminals read that this connection ends now (hang_up_restarting follows)."""
        if self.attachment is not None and self.attached_at is not None:
            for session in list(self.attachment.sessions):
                session.notify(drain.closing_notice(self.session_id))

    def hang_up_restarting(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, drain.disconnect_reason(self.session_id))

    def _hang_up(self, line: str) -> None:
        """Clients without a session channel (ssh -N) still read the reason in the disconnect."""
        if self.conn is not None and not self.conn.is_closed():
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"orz: {line}")

    async def _attach(self) -> None:
        assert self.attachment is not None and self.principal is not None and self.reply is not None
        try:
            reply = await self.gw.router.until_running(self.session_id, self.principal, self.reply,
                                                       source=self.source, progress=self.attachment.progress)
            assert reply.route is not None
            self.reply, self.mode = None, reply.mode  # the route is used once, just below
            upstream = await connect_upstream(reply.route, reply.mode, self.gw.client_key,
                                              agent_path=self.agent.path, on_lost=self._upstream_lost,
                                              client_version=self._client_version())
        except (AttachRefused, UpstreamUnavailable) as exc:
            self.log.info("attach to %s failed: %s", self.session_id, exc.internal or exc.line)
            metrics.attach_failed("ssh", exc.code)
            self.attachment.refuse(exc)
            asyncio.get_running_loop().call_later(REFUSED_LINGER_S, self._hang_up, exc.line)
            return
        if self.conn is None or self.conn.is_closed():
            upstream.close()
            return
        self.attachment.set_upstream(upstream)
        self.attached_at = time.monotonic()
        metrics.attached("ssh", self.attached_at - (self.auth_done_at or self.attached_at))
        self.log.info("attached to %s (%s)", self.session_id, reply.mode,
                      extra={"event": "attached", "conn_id": self.id, "session_id": self.session_id,
                             "user_id": self.principal.user_id, "source": self.source, "mode": reply.mode})
        await self.gw.router.report(AttachEventIn(
            session_id=self.session_id, user_id=self.principal.user_id, event="attached",
            connection_id=self.id, source_address=self.source))

    def _client_version(self) -> str:
        """The user's client's SSH version string (the upstream connection names its software)."""
        return str(self.conn.get_extra_info("client_version", "") or "") if self.conn is not None else ""

    def _upstream_lost(self) -> None:
        """The runner went away: the client has nothing left to talk to. (A callback rather than a task
        waiting for it: an idle attached session keeps no task, coroutine frames or future.)"""
        if self.attached_at is not None and self.conn is not None and not self.conn.is_closed():
            # ssh prints this as its last line (a bare close reads "Disconnected by application").
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, _runner_gone_reason(self.session_id))

    # -- channels ------------------------------------------------------------------------------------

    def _channel_room(self) -> None:
        """Refuse a new channel when the connection already has its cap open (both directions: the client's
        shells and -L connections, the gateway's agent and -R ones). Each channel costs a channel to the
        runner and the gateway's memory, so one authenticated connection must not open them without end."""
        cap = self.gw.settings.gateway_channels_per_connection
        # asyncssh keeps every open channel of the connection there (gateway/splice.py reads it too); a
        # channel being opened is not in it yet.
        open_now = len(getattr(self.conn, "_channels", ()))
        if open_now >= cap:
            log.info("%s: channel refused: %d channels open (limit %d)", self.id, open_now, cap)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                f"orz: this connection has {open_now} channels open, the most one may "
                f"(ORZ_GATEWAY_CHANNELS_PER_CONNECTION); close some or open another connection")

    def session_requested(self) -> BridgeSession:
        assert self.attachment is not None
        self._channel_room()
        return BridgeSession(self.attachment, readonly=self.readonly,
                             fast_path=self.gw.settings.gateway_fast_path)

    def _client_agent_path(self) -> str | None:
        return self.conn.get_agent_path() if self.conn is not None else None

    def _may_forward(self) -> bool:
        """ORZ_PERMIT_PORT_FORWARDING for every login: a certificate without it is refused by asyncssh, and an
        attach token (a password, the web door's tunnel) carries no certificate to leave it out of."""
        return self.gw.settings.permit_port_forwarding

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Awaitable[Pipe]:
        if self.attachment is None or self.readonly or self.refusal is not None or not self._may_forward():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "orz: port forwarding is not permitted on this attach")
        self._channel_room()
        return open_direct(self.attachment, dest_host, dest_port, orig_host, orig_port,
                           fast_path=self.gw.settings.gateway_fast_path)

    def server_requested(self, listen_host: str,
                         listen_port: int) -> Literal[False] | Awaitable[asyncssh.SSHListener]:
        if self.attachment is None or self.readonly or self.refusal is not None or self.conn is None \
                or not self._may_forward():
            return False
        return open_remote_listener(self.attachment, self.conn, listen_host, listen_port,
                                    fast_path=self.gw.settings.gateway_fast_path)


def _anchor_problem(exc: OSError | PublicKeyError, settings: Settings) -> tuple[str, str]:
    """What is wrong with the trust anchors: (the line ``/readyz`` may tell anyone, which names the anchor but
    not its file, and the line for the log, with the file's path)."""
    names = {str(auth.ca_public_path(settings)): "the SSH CA public key",
             str(auth.jwt_public_path(settings)): "the JWT public key"}
    if isinstance(exc, OSError):
        what = names.get(str(exc.filename or ""), "a trust anchor")
        public = f"{what} {'is missing' if isinstance(exc, FileNotFoundError) else 'cannot be read'}"
        return public, f"{exc.filename or 'a trust anchor file'}: {exc.strerror or type(exc).__name__}"
    public = str(exc)
    for path, what in names.items():  # the key's problem (empty, a private key, not P-256), not where it lives
        public = public.replace(path, what)
    return public, str(exc)


def _secret(value: SecretStr | str) -> str:
    # Settings built with model_copy(update=...) skip validation, so a plain str can arrive here.
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


class Gateway:
    """The listening SSH gateway: one process serves many client connections."""

    def __init__(self, settings: Settings, *, api: ApiClient | None = None) -> None:
        self.settings = settings
        self.api = api or ApiClient(settings.internal_api_url, _secret(settings.service_token))
        self.router = Router(self.api, start_timeout_s=settings.start_timeout_s)
        self.limiter = auth.FailureLimiter(settings.auth_fail_limit, settings.auth_fail_window_s)
        self.preauth = PreauthLimiter(settings.gateway_preauth_per_source, settings.gateway_preauth_total)
        self.attach_slots = AttachSlots(settings.gateway_attachments_per_user)
        self._anchors: auth.TrustAnchors | None = None
        self._anchor_problem: str | None = None
        self._anchor_public: str = ""  # the problem as /readyz tells it (no file paths)
        self.host_key = keys.load_or_create(keys.host_key_path(settings), "orz-gateway-host")
        self.client_key = keys.load_or_create(keys.client_key_path(settings), "orz-gateway-client")
        self.connections: set[ClientHandler] = set()
        self.web_terminals: set[LiveTerminal] = set()  # browser terminals, for the access watch and drain
        self.access_watch = AccessWatch(self.api, settings.gateway_access_check_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self.metrics_server: MetricsServer | None = None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="orz-gw-"))  # 0700: agent links live here
        # (loopback address, port) of web-door SSH tunnels -> the WebSocket client's address.
        self.tunnel_sources: dict[tuple[str, int], str] = {}
        self.web: WebDoor | None = None
        self.draining = False  # set by drain(): no new connections, /readyz answers 503
        self.ssh_options: asyncssh.SSHServerConnectionOptions | None = None  # the listener's, set by start()

    @property
    def anchors(self) -> auth.TrustAnchors:
        """The CA and JWT public keys; read on first use, since the API may create them after we start."""
        if self._anchors is None:
            try:
                self._anchors = auth.load_trust_anchors(self.settings)
            except (OSError, PublicKeyError) as exc:
                self._anchor_public, problem = _anchor_problem(exc, self.settings)
                if problem != self._anchor_problem:  # once per distinct problem, not once per probe
                    log.error("gateway cannot verify credentials: %s", problem)
                    self._anchor_problem = problem
                raise CredentialsUnavailable("Orzbob Cloud cannot verify credentials right now",
                                             internal=problem) from exc
            if self._anchor_problem is not None:
                log.info("gateway trust anchors loaded")
                self._anchor_problem = None
        return self._anchors

    def readiness(self) -> str | None:
        """None when this gateway can take attaches; else one line saying why not (no key material)."""
        if self.draining:
            return "draining: this gateway is shutting down"
        if self._server is None or not self._server.is_serving():
            return "SSH listener is not up"
        try:
            self.anchors  # noqa: B018  # loads them, or says why it cannot
        except CredentialsUnavailable:
            # Unauthenticated callers read this: which anchor and what is wrong, never its path (logged above).
            return f"trust anchors not loaded: {self._anchor_public}"
        return None

    async def share_failure(self, source: str) -> None:
        """Report a failed authentication to the API; at the shared limit, refuse the source here too."""
        reply = await self.router.report_failure(source)
        if reply is not None and reply.retry_after_s > 0:
            self.limiter.block_for(source, reply.retry_after_s)

    def spawn(self, coro: object) -> None:
        """Run a background task; a failure is logged when it happens, not at garbage collection."""
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway background task %s failed", task.get_name(), exc_info=task.exception())

    async def start(self) -> None:
        pin_local_username()
        options = await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: ClientHandler(self), server_host_keys=[self.host_key],
            **ssh_algorithms(), compression_algs=None, line_editor=False, encoding=None,
            agent_forwarding=True, x11_forwarding=False, allow_scp=False, config=None,
            login_timeout=self.settings.gateway_login_timeout_s, keepalive_interval=60, keepalive_count_max=3,
            server_version="OrzbobCloud",
        )
        self.ssh_options = options
        loop = asyncio.get_running_loop()
        # Our own listener so connections use ClientSideConnection (asyncssh.listen has no class hook).
        self._server = await loop.create_server(
            lambda: AdmittedProtocol(ClientSideConnection(loop, options), self.preauth, self.source_of),
            self.settings.ssh_host, self.settings.ssh_port, backlog=1024)
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info("gateway listening on %s:%d", self.settings.ssh_host, self.port)
        self.spawn(self.access_watch.run(self._revocables))
        self.web = WebDoor(self)
        try:
            await self.web.start()
        except OSError:
            log.error("gateway web door cannot listen on %s:%d", self.settings.gateway_web_host,
                      self.settings.gateway_web_port)
            self._server.close()  # serve() never reaches its cleanup when start() fails
            raise
        if self.settings.gateway_metrics_port:
            # Beside the web door's address, never on the public SSH listener.
            try:
                self.metrics_server = metrics.serve(self.settings.gateway_web_host,
                                                    self.settings.gateway_metrics_port)
            except OSError:
                log.error("gateway metrics cannot listen on %s:%d", self.settings.gateway_web_host,
                          self.settings.gateway_metrics_port)
                await self.web.close()
                self._server.close()
                raise

    def source_of(self, peer: tuple[Any, ...] | None) -> str:
        """The client's address; for SSH over the web door, the WebSocket client's, not loopback."""
        if not peer:
            return "?"
        return self.tunnel_sources.get((str(peer[0]), int(peer[1])), str(peer[0]))

    def _revocables(self) -> list[Revocable]:
        return [*self.connections, *self.web_terminals]

    @property
    def port(self) -> int:
        """The bound SSH port (kept after a drain closed the listener)."""
        assert self._port is not None
        return self._port

    def open_connections(self) -> int:
        """Client connections (SSH, web-door tunnels included) and browser terminals still open."""
        return len(self.connections) + len(self.web_terminals)

    async def drain(self, deadline_s: float, stop: Awaitable[object]) -> str:
        """Stop taking connections, tell attached users, and let the open ones run until they end,
        ``deadline_s`` passes or ``stop`` completes (a second signal); then disconnect what is left with
        the reason. Returns why the wait ended (gateway.drain.wait_drained). close() follows."""
        self.draining = True
        if self._server is not None:
            self._server.close()  # no new SSH connections; open ones keep their transports
        log.info("gateway draining: %d connections open, up to %.0f s (a second signal ends it now)",
                 self.open_connections(), deadline_s,
                 extra={"event": "drain_started", "connections": self.open_connections()})
        for client in list(self.connections):
            client.draining()
        for terminal in list(self.web_terminals):
            terminal.draining()
        ended = await drain.wait_drained(self.open_connections, deadline_s, stop)
        left = self.open_connections()
        log.info("gateway drain ended (%s): %d connections closed now", ended, left,
                 extra={"event": "drain_ended", "reason": ended, "connections": left})
        if left:
            for client in list(self.connections):
                client.drain_ending()
            await asyncio.sleep(DRAIN_LAST_WORD_S)  # terminals show the line before their connection goes
        for client in list(self.connections):
            client.hang_up_restarting()
        for terminal in list(self.web_terminals):
            terminal.draining_ended()
        if left:
            await asyncio.sleep(0.2)  # let the disconnect messages leave before the transports close
        return ended

    async def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.web is not None:
            await self.web.close()
        if self._server is not None:
            self._server.close()
        for client in list(self.connections):
            if client.conn is not None:
                client.conn.close()
        if self._server is not None:
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.api.aclose()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Gateway]:
    """A started gateway (``.port`` is the bound SSH port), closed on exit."""
    gateway = Gateway(settings)
    await gateway.start()
    metrics.count_tasks(asyncio.get_running_loop())
    try:
        yield gateway
    finally:
        await gateway.close()
