"""/v1/instances: create, list, inspect, stop, start and delete sessions."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request

from api import metrics, schemas
from api.errors import ComputeUnavailable, OrzError, QuotaExceeded, ValidationFailed
from api.http import parse_body, query_flag, respond
from api.instances.views import event_view, instance_view
from api.openapi import QueryParam, route
from api.routes.attach import attach_token
from api.routes.deps import principal, state

bp = Blueprint("instances")
TAG = "instances"


@route(bp, "POST", "/v1/instances", summary="Create a session", tag=TAG, request=schemas.InstanceCreate,
       responses={201: schemas.Instance}, errors=(429, 503), body_required=False)
async def create_instance(request: Request) -> HTTPResponse:
    who = await principal(request)  # an unauthenticated request is not counted as a create attempt
    try:
        body = parse_body(request, schemas.InstanceCreate, allow_empty=True)
        row = await state(request).instances.create(who, body)
    except Exception as exc:
        metrics.SESSION_CREATIONS.labels(result=creation_result(exc)).inc()
        raise
    metrics.SESSION_CREATIONS.labels(result="created").inc()
    request.ctx.session_id = row.id
    # attach_url carries a fresh single-use token, as the Go API's did: its CLI attaches with it.
    return respond(instance_view(state(request).settings, row, attach_token(request, who, row)), status=201)


def creation_result(exc: BaseException) -> str:
    """The `result` label of a failed create: the caller's fault, the plan's limit, or ours."""
    if isinstance(exc, QuotaExceeded):
        return "quota"
    if isinstance(exc, ComputeUnavailable):
        return "provider_error"
    if isinstance(exc, OrzError) and exc.status < 500:
        return "invalid"
    return "error"


@route(bp, "GET", "/v1/instances", summary="List your org's sessions with the quota",
       tag=TAG, responses={200: schemas.InstanceList})
async def list_instances(request: Request) -> HTTPResponse:
    who = await principal(request)
    svc = state(request).instances
    rows = await svc.list(who)
    quota = await svc.quota(who.org_id, who.plan)
    settings = state(request).settings
    return respond(schemas.InstanceList(instances=[instance_view(settings, r) for r in rows], quota=quota))


@route(bp, "GET", "/v1/instances/{id}", summary="Get a session", tag=TAG,
       responses={200: schemas.Instance}, errors=(403, 404))
async def get_instance(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    row = await state(request).instances.get(who, id)
    return respond(instance_view(state(request).settings, row, attach_token(request, who, row)))


FORCE = QueryParam("force", {"type": "boolean", "default": False},
                   "delete even when the workspace may hold unsaved work (uncommitted files or unpushed commits "
                   "not pushed to orz/<id>). Without it a live session is stopped first and its runner's final "
                   "report decides: unsaved work is a 409 `unsaved_work` listing it, no report in time a 409 "
                   "`work_unknown`; either way the session stays stopped with its workspace kept")


@route(bp, "DELETE", "/v1/instances/{id}", summary="Kill a session: compute and workspace", tag=TAG,
       responses={200: schemas.Instance}, errors=(403, 404, 409, 422, 503), query=(FORCE,))
async def delete_instance(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    force = query_flag(request, "force")
    row = await state(request).instances.delete(who, id, force=force)
    return respond(instance_view(state(request).settings, row))


@route(bp, "POST", "/v1/instances/{id}/stop", summary="Stop a session, keeping its workspace", tag=TAG,
       responses={200: schemas.Instance}, errors=(403, 404, 409, 503))
async def stop_instance(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    row = await state(request).instances.stop(who, id)
    return respond(instance_view(state(request).settings, row))


@route(bp, "POST", "/v1/instances/{id}/start", summary="Start a stopped session", tag=TAG,
       request=schemas.StartRequest, responses={200: schemas.Instance}, errors=(403, 404, 409, 422, 429, 503),
       body_required=False)
async def start_instance(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    body = parse_body(request, schemas.StartRequest, allow_empty=True)
    row = await state(request).instances.start(who, id, pull=body.pull)
    return respond(instance_view(state(request).settings, row))


@route(bp, "GET", "/v1/instances/{id}/status", summary="A session with its latest events", tag=TAG,
       responses={200: schemas.InstanceStatus}, errors=(403, 404))
async def instance_status(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    svc = state(request).instances
    row = await svc.get(who, id)
    events = await svc.events(who, id)
    program_exit = await svc.program_exit(who, row)
    return respond(schemas.InstanceStatus(instance=instance_view(state(request).settings, row),
                                          events=[event_view(e) for e in events], program_exit=program_exit))


@route(bp, "GET", "/v1/instances/{id}/logs", summary="The session's init log and events", tag=TAG,
       responses={200: schemas.InstanceLogs}, errors=(403, 404))
async def instance_logs(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    svc = state(request).instances
    init_log = await svc.read_log(who, id)
    events = await svc.events(who, id, limit=100)
    return respond(schemas.InstanceLogs(id=id, init_log=init_log, events=[event_view(e) for e in events]))


RECORDING_PARTS = ("current", "previous")


RECORDING_PART = QueryParam("part", {"type": "string", "enum": list(RECORDING_PARTS), "default": "current"},
                            "which part of the recording: the one being written, or the previous one its size "
                            "cap rotated out")


@route(bp, "GET", "/v1/instances/{id}/recording",
       summary="The agent pane's recording (asciicast v2; ?part=previous for the part rotated out)", tag=TAG,
       responses={200: None}, errors=(403, 404, 422), content_type=schemas.RECORDING_CONTENT_TYPE,
       query=(RECORDING_PART,))
async def instance_recording(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    part = request.args.get("part", "current")
    if part not in RECORDING_PARTS:
        raise ValidationFailed.of("part", f"part must be one of {', '.join(RECORDING_PARTS)}")
    data = await state(request).instances.read_recording(who, id, previous=part == "previous")
    # What the agent printed may be secret: never kept by a shared cache.
    return HTTPResponse(data, content_type=schemas.RECORDING_CONTENT_TYPE,
                        headers={"Cache-Control": "private, no-store",
                                 "Content-Disposition": f'attachment; filename="{id}.cast"'})
