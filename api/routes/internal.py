"""/internal/v1: the runner's heartbeats and the gateway's authorize and attach events."""

from __future__ import annotations

import asyncio
import re

from sanic import Blueprint, HTTPResponse, Request

from api import failed_auth, schemas
from api import log as orz_log
from api.auth import bearer_token
from api.errors import BadRequest, PayloadTooLarge
from api.http import parse_body, respond
from api.openapi import QueryParam, route
from api.routes.deps import require_service, state

bp = Blueprint("internal")
TAG = "internal"
OFFSET_RE = re.compile(r"^[0-9]{1,15}$")


@route(bp, "POST", "/internal/v1/instances/{id}/heartbeat", summary="Runner heartbeat", tag=TAG,
       request=schemas.Heartbeat, responses={200: schemas.HeartbeatReply}, security="runner_token")
async def heartbeat(request: Request, id: str) -> HTTPResponse:
    token = bearer_token(request.headers.get("authorization"))
    body = parse_body(request, schemas.Heartbeat)
    request.ctx.session_id = id
    # Shielded: a runner that exits right after sending must not cancel a half-done state change.
    reply = await asyncio.shield(state(request).instances.record_heartbeat(id, token, body))
    return respond(reply)


UPLOAD_QUERY = (
    # No pattern (letters, digits, '-', '_'; the route says so with a 400): generating from one costs the
    # property-based run more than it finds on a route only a runner's token reaches.
    QueryParam("part", {"type": "string", "minLength": 1, "maxLength": 64},
               "the recording part the bytes belong to, named by the runner: 1 to 64 letters, digits, '-' or '_'",
               required=True),
    QueryParam("offset", {"type": "integer", "minimum": 0, "maximum": 10**15 - 1},
               "where in the part the bytes go (the API answers 409 with its own offset when they do not fit)",
               required=True),
)


@route(bp, "POST", "/internal/v1/instances/{id}/recording",
       summary="Runner: append the pane recording's next bytes (raw body; ?part=NAME&offset=N)", tag=TAG,
       responses={200: schemas.RecordingAck}, errors=(400, 403, 409, 413), security="runner_token",
       query=UPLOAD_QUERY)
async def recording_upload(request: Request, id: str) -> HTTPResponse:
    token = bearer_token(request.headers.get("authorization"))
    request.ctx.session_id = id
    data = request.body or b""
    # Below the server-wide body limit: one upload is a few seconds of output, never a whole part.
    if len(data) > schemas.RECORDING_UPLOAD_MAX_BYTES:
        raise PayloadTooLarge(f"an upload holds at most {schemas.RECORDING_UPLOAD_MAX_BYTES} bytes")
    part = request.args.get("part", "")
    offset = request.args.get("offset", "")
    if not OFFSET_RE.match(offset):
        raise BadRequest("offset must be a whole number of bytes")
    ack = await asyncio.shield(state(request).instances.upload_recording(id, token, part, int(offset), data))
    return respond(ack)


@route(bp, "POST", "/internal/v1/authorize", summary="Gateway: may this user attach, and where", tag=TAG,
       request=schemas.AuthorizeRequest, responses={200: schemas.AuthorizeReply},
       errors=(400, 403, 404, 409, 429, 503), security="service_token")
async def authorize(request: Request) -> HTTPResponse:
    require_service(request)
    body = parse_body(request, schemas.AuthorizeRequest)
    request.ctx.session_id, request.ctx.user_id = body.session_id, body.user_id
    orz_log.bind(session_id=body.session_id, user_id=body.user_id)  # for every line while deciding
    return respond(await state(request).instances.authorize(body))


@route(bp, "POST", "/internal/v1/attach-events", summary="Gateway: a client attached or detached", tag=TAG,
       request=schemas.AttachEventIn, responses={204: None}, errors=(404,), security="service_token")
async def attach_event(request: Request) -> HTTPResponse:
    require_service(request)
    body = parse_body(request, schemas.AttachEventIn)
    request.ctx.session_id, request.ctx.user_id = body.session_id, body.user_id
    orz_log.bind(session_id=body.session_id, user_id=body.user_id)
    await asyncio.shield(state(request).instances.record_attach_event(body))
    return HTTPResponse(status=204)


@route(bp, "POST", "/internal/v1/auth-failures", summary="Gateway: count a failed authentication, shared by replicas",
       tag=TAG, request=schemas.AuthFailureIn, responses={200: schemas.AuthFailureReply}, security="service_token")
async def auth_failure(request: Request) -> HTTPResponse:
    require_service(request)
    body = parse_body(request, schemas.AuthFailureIn)
    st = state(request)
    return respond(await failed_auth.record(st.sessions, body.source_address, st.settings))


@route(bp, "POST", "/internal/v1/access-check", summary="Gateway: which live attachments must end now",
       tag=TAG, request=schemas.AccessCheck, responses={200: schemas.AccessCheckReply}, security="service_token")
async def access_check(request: Request) -> HTTPResponse:
    require_service(request)
    body = parse_body(request, schemas.AccessCheck)
    return respond(await state(request).instances.check_access(body))
