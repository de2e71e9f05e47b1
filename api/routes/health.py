"""Liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sqlalchemy import func, select, text

from api import metrics, schemas
from api.db.models import Instance
from api.http import respond
from api.instances.states import State
from api.openapi import build_document, route
from api.routes.deps import state

bp = Blueprint("health")
# Only on the metrics listener (create_metrics_app), never on the public port.
metrics_bp = Blueprint("metrics")
TAG = "health"
# How long /readyz waits for the database's answer. Shorter than the chart's readiness probe timeout
# (3 s), so a slow database gets a 503 naming it rather than a probe that gave up without a reason.
READY_DB_TIMEOUT_S = 2.0


def package_version() -> str:
    try:
        return version("orzbob-cloud")
    except PackageNotFoundError:
        return "0.0.0+local"


@route(bp, "GET", "/healthz", summary="The process is alive", tag=TAG, responses={200: schemas.Health},
       security=None)
async def healthz(request: Request) -> HTTPResponse:
    return respond(schemas.Health(status="ok"))


@route(bp, "GET", "/readyz", summary="The database answers", tag=TAG,
       responses={200: schemas.Health, 503: schemas.Health}, security=None)
async def readyz(request: Request) -> HTTPResponse:
    if request.app.ctx.state is None:  # waiting for the schema: alive, not ready
        problem = getattr(request.app.ctx, "schema_problem", None) or "starting"
        return respond(schemas.Health(status="unavailable", checks={"schema": problem[:300]}), 503)
    try:
        await asyncio.wait_for(_database_answers(request), READY_DB_TIMEOUT_S)
    except TimeoutError:
        return respond(schemas.Health(status="unavailable",
                                      checks={"database": f"no answer within {READY_DB_TIMEOUT_S:g} s"}), 503)
    except Exception as exc:
        return respond(schemas.Health(status="unavailable", checks={"database": type(exc).__name__}), 503)
    return respond(schemas.Health(status="ok", checks={"database": "ok"}))


async def _database_answers(request: Request) -> None:
    async with state(request).sessions() as db:
        await db.execute(text("SELECT 1"))


@metrics_bp.get("/metrics")
async def prometheus_metrics(request: Request) -> HTTPResponse:
    api = request.app.ctx.api  # the API app whose process this listener reports on
    st = api.ctx.state
    if st is None:
        # The listener accepts connections while the API is still opening its database.
        return HTTPResponse("starting\n", status=503, content_type="text/plain")
    async with st.sessions() as db:
        rows = (await db.execute(select(Instance.state, func.count()).group_by(Instance.state))).all()
    counts = dict(rows)
    for s in State:
        metrics.SESSIONS_BY_STATE.labels(state=s.value).set(counts.get(s.value, 0))
    # Other services running in this process (the embedded server) add their registries here.
    extra = getattr(api.ctx, "extra_metrics", ())
    return HTTPResponse(metrics.exposition(*extra), content_type=CONTENT_TYPE_LATEST)


@bp.get("/v1/openapi.json")
async def openapi_document(request: Request) -> HTTPResponse:
    doc = request.app.ctx.openapi
    if doc is None:
        doc = request.app.ctx.openapi = build_document(package_version())
    return json_response(doc)
