"""Test-only API routes for features other branches build (attach, secrets), used when absent.

They follow api/schemas.py so the CLI is exercised against the real contract; once the real routes
are merged (api.routes.attach / api.routes.secrets), the live server uses those instead.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import asyncssh
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

from api import schemas
from api.routes.deps import principal, state

CA_KEY = asyncssh.generate_private_key("ssh-ed25519")


def sign(public_key: str, principal_name: str, ttl_s: int) -> tuple[str, int]:
    """A user certificate for public_key valid until now+ttl_s (a negative ttl gives an expired one)."""
    now = int(time.time())
    before = now + ttl_s
    cert = CA_KEY.generate_user_certificate(
        asyncssh.import_public_key(public_key), "user:test", principals=[principal_name],
        valid_after=min(now - 30, before - 60), valid_before=before,
    )
    return cert.export_certificate("openssh").decode().strip(), before


def attach_blueprint(ssh_port: int, cert_ttl_s: int = 300) -> Blueprint:
    bp = Blueprint("test_attach")

    @bp.post("/v1/instances/<sid>/attach")
    async def attach(request: Request, sid: str) -> HTTPResponse:
        who = await principal(request)
        row = await state(request).instances.get(who, sid)
        req = schemas.AttachRequest.model_validate(request.json or {})
        cert, before = sign(req.public_key or "", sid, cert_ttl_s) if req.public_key else (None, 0)
        grant = schemas.AttachGrant(
            id=sid, status=row.state, user=who.email, certificate=cert,
            certificate_expires_at=datetime.fromtimestamp(before, UTC) if cert else None,
            token="jwt-test", token_expires_at=datetime.now(UTC), ssh=f"ssh -p {ssh_port} {sid}@127.0.0.1",
            ssh_host="127.0.0.1", ssh_port=ssh_port, attach_url="ws://127.0.0.1/x", readonly=req.readonly,
        )
        return json_response(grant.model_dump(mode="json"))

    return bp


def secrets_blueprint() -> Blueprint:
    """In-memory /v1/secrets per org (values kept, never returned)."""
    bp = Blueprint("test_secrets")
    store: dict[tuple[str, str], tuple[schemas.SecretCreate, datetime]] = {}

    def view(body: schemas.SecretCreate, at: datetime) -> dict[str, object]:
        return schemas.Secret(name=body.name, keys=sorted(body.data), scope=body.scope, created_at=at,
                              updated_at=at).model_dump(mode="json")

    @bp.post("/v1/secrets")
    async def create(request: Request) -> HTTPResponse:
        who = await principal(request)
        body = schemas.SecretCreate.model_validate(request.json)
        store[(who.org_id, body.name)] = (body, datetime.now(UTC))
        return json_response(view(*store[(who.org_id, body.name)]), status=201)

    @bp.get("/v1/secrets")
    async def list_(request: Request) -> HTTPResponse:
        who = await principal(request)
        items = [view(b, at) for (org, _), (b, at) in sorted(store.items()) if org == who.org_id]
        return json_response({"secrets": items})

    @bp.delete("/v1/secrets/<name>")
    async def delete(request: Request, name: str) -> HTTPResponse:
        who = await principal(request)
        if store.pop((who.org_id, name), None) is None:
            return json_response({"type": "about:blank", "title": "Not found", "status": 404,
                                  "detail": f"no such secret: {name}", "code": "not_found"}, status=404)
        return HTTPResponse(status=204)

    return bp
