"""/v1/secrets: create, list, inspect, replace and delete secrets. Values go in, never come out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sanic import Blueprint, HTTPResponse, Request

from api import schemas
from api.errors import ValidationFailed
from api.http import parse_body, respond
from api.openapi import QueryParam, route
from api.routes.deps import principal, state
from api.secrets.service import ScopeName, secret_view

if TYPE_CHECKING:
    from api.secrets.service import SecretService

bp = Blueprint("secrets")
TAG = "secrets"


def _service(request: Request) -> SecretService:
    svc = state(request).secrets
    assert svc is not None
    return svc


SCOPE = QueryParam("scope", {"type": "string", "enum": ["user", "org"]},
                   "which of two secrets of this name: yours (`user`) or your org's (`org`); without it yours wins")


def _scope(request: Request) -> ScopeName | None:
    """``?scope=user|org`` picks one of two same-named secrets; without it the user's own wins."""
    value = request.args.get("scope")
    if value is None:
        return None
    if value not in ("user", "org"):
        raise ValidationFailed.of("scope", "scope must be 'user' or 'org'")
    return value  # type: ignore[return-value]


@route(bp, "POST", "/v1/secrets", summary="Create a secret (values are never shown again)", tag=TAG,
       request=schemas.SecretCreate, responses={201: schemas.Secret}, errors=(403, 409))
async def create_secret(request: Request) -> HTTPResponse:
    who = await principal(request)
    body = parse_body(request, schemas.SecretCreate)
    row = await _service(request).create(who, body)
    return respond(secret_view(row), status=201)


@route(bp, "GET", "/v1/secrets", summary="List your secrets and your org's: names, keys, times",
       tag=TAG, responses={200: schemas.SecretList})
async def list_secrets(request: Request) -> HTTPResponse:
    who = await principal(request)
    rows = await _service(request).list(who)
    return respond(schemas.SecretList(secrets=[secret_view(r) for r in rows]))


@route(bp, "GET", "/v1/secrets/{name}", summary="Get a secret's names and keys (no values)", tag=TAG,
       responses={200: schemas.Secret}, errors=(404, 422), query=(SCOPE,))
async def get_secret(request: Request, name: str) -> HTTPResponse:
    who = await principal(request)
    row = await _service(request).get(who, name, _scope(request))
    return respond(secret_view(row))


@route(bp, "PUT", "/v1/secrets/{name}", summary="Replace a secret's data", tag=TAG,
       request=schemas.SecretReplace, responses={200: schemas.Secret}, errors=(403, 404), query=(SCOPE,))
async def replace_secret(request: Request, name: str) -> HTTPResponse:
    who = await principal(request)
    body = parse_body(request, schemas.SecretReplace)
    row = await _service(request).replace(who, name, body, _scope(request))
    return respond(secret_view(row))


@route(bp, "DELETE", "/v1/secrets/{name}", summary="Delete a secret", tag=TAG,
       responses={204: None}, errors=(403, 404, 422), query=(SCOPE,))
async def delete_secret(request: Request, name: str) -> HTTPResponse:
    who = await principal(request)
    await _service(request).delete(who, name, _scope(request))
    return HTTPResponse(status=204)
