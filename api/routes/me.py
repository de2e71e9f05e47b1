"""/v1/me: who the token belongs to, their org, plan and quota use."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request

from api import schemas
from api.gateway_keys import known_hosts_name
from api.http import respond
from api.openapi import route
from api.routes.deps import gateway_host_keys, principal, state

bp = Blueprint("me")


@route(bp, "GET", "/v1/me", summary="The caller, their org and quota", tag="me", responses={200: schemas.Me})
async def me(request: Request) -> HTTPResponse:
    who = await principal(request)
    quota = await state(request).instances.quota(who.org_id, who.plan)
    idle_timeout_s, retention_s = await state(request).instances.org_limits(who.org_id)
    return respond(schemas.Me(
        user=schemas.MeUser(id=who.user_id, email=who.email, role=who.role,  # type: ignore[arg-type]
                            is_admin=who.is_admin),
        org=schemas.MeOrg(id=who.org_id, name=who.org_name, plan=who.plan, idle_timeout_s=idle_timeout_s,
                          retention_s=retention_s),
        quota=quota,
        gateway=gateway_view(request),
        source=who.source,
    ))


def gateway_view(request: Request) -> schemas.MeGateway:
    settings = state(request).settings
    host, port = settings.public_ssh_host, settings.public_ssh_port
    keys = gateway_host_keys(request)
    name = known_hosts_name(host, port)
    return schemas.MeGateway(ssh_host=host, ssh_port=port, host_keys=keys,
                             known_hosts=[f"{name} {key}" for key in keys])
