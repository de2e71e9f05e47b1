"""The Sanic application: wiring of settings, database, provider, services, routes and errors."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.exceptions import RequestCancelled, SanicException
from sanic.handlers import ErrorHandler
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api import log as orz_log
from api import metrics
from api.auth import PrincipalCache
from api.credentials.secrets_box import SecretsBox
from api.db.engine import autocommit_session_factory, create_engine, is_connection_failure, session_factory
from api.db.migrate import ensure_at_head, wait_for_schema
from api.errors import (
    STATUS_TO_ERROR,
    ClientClosedRequest,
    DatabaseUnavailable,
    OrzError,
    SchemaNotAtHead,
    TooManyAttempts,
)
from api.gateway_keys import gateway_host_public_key, gateway_public_key
from api.instances.providers.base import Provider
from api.instances.service import InstanceService, SecretEnvSource
from api.log import without_credentials
from api.routes import attach, auth, health, instances, internal, me
from api.routes import secrets as secrets_routes
from api.routes import tokens as tokens_routes
from api.routes import webhooks as webhooks_routes
from api.secrets.service import SecretService
from api.settings import Settings
from api.signin.service import SignInService
from api.webhooks.delivery import Deliverer
from api.webhooks.service import WebhookService

log = logging.getLogger(__name__)
_app_numbers = itertools.count(1)


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    provider: Provider
    instances: InstanceService
    principals: PrincipalCache
    secrets: SecretService | None = None
    # For single statements (reads, one-row updates): no BEGIN/COMMIT round trips.
    autocommit: async_sessionmaker[AsyncSession] | None = None
    signin: SignInService | None = None
    webhooks: WebhookService | None = None


def make_provider(settings: Settings) -> Provider:
    if settings.provider == "fake":
        from api.instances.providers.fake import FakeProvider

        return FakeProvider()
    if settings.provider == "local":
        from api.instances.providers.local import LocalProvider

        return LocalProvider(settings)
    from api.instances.providers.kubernetes.provider import KubernetesProvider

    return KubernetesProvider(settings)


class ProblemHandler(ErrorHandler):
    """Every error leaves as application/problem+json; unexpected ones as a bare 500."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        if isinstance(exception, OrzError):
            error = exception
        elif isinstance(exception, SanicException):
            status = int(getattr(exception, "status_code", 500) or 500)
            cls = STATUS_TO_ERROR.get(status)
            error = cls(_sanic_detail(status, exception)) if cls else OrzError()
        elif isinstance(exception, RequestCancelled):
            # A heartbeat from a runner being stopped, a CLI the user interrupted: the connection is gone,
            # nobody reads the answer, and counting it as a 500 would spend the API's error budget.
            log.info("client went away during %s %s", request.method, without_credentials(request.path))
            error = ClientClosedRequest()
        elif is_connection_failure(exception):
            where = f"{request.method} {without_credentials(request.path)}"
            error = DatabaseUnavailable("the database is unavailable; retry in a moment",
                                        internal=f"{type(exception).__name__} on {where}")
        else:
            log.error("unhandled error on %s %s", request.method, without_credentials(request.path),
                      exc_info=exception)
            error = OrzError("internal error; it has been logged")
        if error.internal:
            log.warning("%s: %s", error.code, error.internal)
        body = error.to_problem(instance=request.path)
        headers = {"X-Request-Id": getattr(request.ctx, "request_id", "")}
        if error.status == 503:
            headers["Retry-After"] = "1"
        if isinstance(error, TooManyAttempts):
            headers["Retry-After"] = str(error.retry_after_s)
        if error.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="orzbob-cloud"'
        if error.status == 405:
            # Sanic names the methods for some paths only (not for two routes on one dynamic path).
            allowed = getattr(exception, "allowed_methods", None) or allowed_methods(request)
            if allowed:
                headers["Allow"] = ", ".join(sorted(allowed))
        return HTTPResponse(
            _json_dumps(body), status=error.status, headers=headers, content_type="application/problem+json"
        )


def allowed_methods(request: Request) -> set[str]:
    """The methods the app's routes serve on this request's path (for a 405's Allow header)."""
    parts = request.path.strip("/").split("/")
    found: set[str] = set()
    for r in request.app.router.routes:
        if len(r.parts) == len(parts) and all(
            want.startswith("<") or want == got for want, got in zip(r.parts, parts, strict=True)
        ):
            found |= set(r.methods)
    return found


def create_metrics_app(api: Sanic) -> Sanic:
    """/metrics of ``api``'s process for its own listener (settings.api_metrics_port).

    The public port does not serve it: it shows how many sessions exist and the request mix, and a
    scraper reaches the metrics port inside the cluster only (chart: a ClusterIP Service of its own).
    """
    app = Sanic(f"{api.name}_metrics", error_handler=ProblemHandler(), configure_logging=False)
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.ACCESS_LOG = False
    # Sanic's TouchUp rewrites its shared HTTP class once per process; a second app doing it again fails.
    app.config.TOUCHUP = False
    app.ctx.api = api
    app.blueprint(health.metrics_bp)
    return app


def _sanic_detail(status: int, exc: SanicException) -> str:
    if status == 404:
        return "no such endpoint"
    if status == 413:
        return "request body is too large"
    if status == 405:
        return "method not allowed on this endpoint"
    return str(exc) or "bad request"


def _json_dumps(body: dict[str, Any]) -> str:
    import json

    return json.dumps(body)


def create_app(
    settings: Settings,
    *,
    provider: Provider | None = None,
    secret_env: SecretEnvSource | None = None,
    name: str | None = None,
) -> Sanic:
    app = Sanic(name or f"orz_api_{next(_app_numbers)}", error_handler=ProblemHandler(), configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.max_request_bytes
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.KEEP_ALIVE_TIMEOUT = 75
    app.config.ACCESS_LOG = False
    app.ctx.openapi = None
    app.ctx.extra_metrics = []  # registries of services sharing this process (orz server adds the gateway's)
    app.ctx.state = None
    app.blueprint([health.bp, me.bp, instances.bp, internal.bp, auth.bp, attach.bp, secrets_routes.bp,
                   webhooks_routes.bp, tokens_routes.bp])

    app.ctx.schema_problem = None  # why the API is not ready yet, while it waits for the schema
    app.ctx.gave_up = asyncio.Event()  # set when the wait for the schema ran out (`orz api` exits)

    @app.before_server_start
    async def open_resources(app: Sanic, _loop: Any = None) -> None:
        if settings.require_schema_head:
            try:
                await ensure_at_head(settings.database_url)
            except Exception as exc:
                waitable = isinstance(exc, SchemaNotAtHead) or is_connection_failure(exc)
                if not waitable or settings.schema_wait_s <= 0:
                    raise
                # Serve /healthz (alive) and a 503 /readyz meanwhile: waiting is not a crash loop.
                app.ctx.schema_problem = str(exc) or type(exc).__name__
                app.ctx.opening = asyncio.get_running_loop().create_task(_open_when_ready(app))
                return
        _open(app)

    async def _open_when_ready(app: Sanic) -> None:
        try:
            await wait_for_schema(settings.database_url, settings.schema_wait_s)
        except Exception as exc:
            log.error("gave up waiting for the database schema after %d s: %s", settings.schema_wait_s, exc)
            app.ctx.schema_problem = str(exc) or type(exc).__name__
            app.ctx.gave_up.set()
            return
        _open(app)
        app.ctx.schema_problem = None
        log.info("database schema ready: serving")

    def _open(app: Sanic) -> None:
        engine = create_engine(settings.database_url)
        sessions = session_factory(engine)
        autocommit = autocommit_session_factory(engine)
        prov = provider or make_provider(settings)
        box = SecretsBox.from_settings(settings)
        secret_svc = SecretService(sessions, box)
        # Read now so a misconfigured key stops the start; an unknown one is looked for again on attach.
        app.ctx.gateway_host_key = gateway_host_public_key(settings)
        svc = InstanceService(
            settings, sessions, prov, gateway_public_key=gateway_public_key(settings),
            secret_env=secret_env or secret_svc, autocommit_sessions=autocommit,
        )
        svc.on_transition.append(_count_transition)
        app.ctx.state = AppState(settings, engine, sessions, prov, svc, PrincipalCache(settings.auth_cache_ttl_s),
                                 secrets=secret_svc, autocommit=autocommit,
                                 signin=SignInService(settings, sessions, box),
                                 # The API sends only test pings itself; the scheduler sends the rest.
                                 webhooks=WebhookService(settings, sessions, box, Deliverer(settings, sessions, box)))

    @app.after_server_stop
    async def close_resources(app: Sanic, _loop: Any = None) -> None:
        metrics.process_exited()
        opening: asyncio.Task[None] | None = getattr(app.ctx, "opening", None)
        if opening is not None:
            opening.cancel()
        state: AppState | None = app.ctx.state
        if state is None:
            return
        await state.instances.wait_background()
        if state.signin is not None:
            await state.signin.aclose()
        if state.webhooks is not None:
            await state.webhooks.deliverer.stop()
        if provider is None:
            await state.provider.close()
        await state.engine.dispose()

    @app.on_request
    async def start_request(request: Request) -> None:
        request.ctx.started = time.perf_counter()
        incoming = request.headers.get("x-request-id", "")
        request.ctx.request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        session_id = request.match_info.get("id") if "/instances/" in request.path else None
        orz_log.new_context(request_id=request.ctx.request_id,
                            session_id=without_credentials(session_id) if session_id else None)

    @app.on_response
    async def finish_request(request: Request, response: HTTPResponse) -> None:
        elapsed = time.perf_counter() - getattr(request.ctx, "started", time.perf_counter())
        route = route_label(request)
        method = request.method if request.method in METHOD_LABELS else "other"
        metrics.HTTP_DURATION.labels(route=route, method=method, status=response.status).observe(elapsed)
        response.headers["X-Request-Id"] = getattr(request.ctx, "request_id", "")
        if not log.isEnabledFor(logging.INFO):
            return  # the access line is built only when it will be written
        session_id = getattr(request.ctx, "session_id", None)
        orz_log.bind(user_id=getattr(request.ctx, "user_id", None),
                     session_id=without_credentials(session_id) if session_id else None)
        log.info(
            # The path as sent, but a token's value pasted where an id belongs is cut to its prefix.
            "%s %s %s", request.method, without_credentials(request.path), response.status,
            extra={"event": "access", "method": request.method, "route": route,
                   "status": response.status, "duration_ms": round(elapsed * 1000, 2),
                   "remote": request.remote_addr or request.ip},
        )

    return app


# The methods the duration histogram names; any other (a client may send any token as a method) is "other":
# one series per made-up method grew the API's memory and every scrape without bound.
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_ROUTE_PARAM = re.compile(r"<(\w+)(?::[^>]*)?>")


def route_label(request: Request) -> str:
    """The matched route as its template (`/v1/instances/{id}`): bounded label values, and the same
    spelling as the OpenAPI document. Requests that match no route share one label."""
    if not request.route:
        return "unmatched"
    return _route_template(request.route.path)


@functools.lru_cache(maxsize=256)
def _route_template(path: str) -> str:
    return "/" + _ROUTE_PARAM.sub(r"{\1}", path).lstrip("/")


def _count_transition(row: Any, _from: Any, to: Any) -> None:
    metrics.SESSION_TRANSITIONS.labels(to_state=str(to.value)).inc()
