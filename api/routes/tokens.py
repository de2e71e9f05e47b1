"""/v1/tokens: your API tokens. Mint one for a script or CI (shown once), list them, revoke one."""

from __future__ import annotations

import logging

from sanic import Blueprint, HTTPResponse, Request

from api import api_tokens, schemas
from api.auth import bearer_token
from api.db import tokens
from api.db.models import ApiToken
from api.http import parse_body, respond
from api.openapi import route
from api.routes.deps import principal, state

bp = Blueprint("tokens")
TAG = "tokens"
log = logging.getLogger("orz.api")


def token_view(row: ApiToken, current_prefix: str | None = None) -> schemas.ApiTokenInfo:
    return schemas.ApiTokenInfo(id=row.id, name=row.name, prefix=row.prefix, source=row.source,
                                created_at=row.created_at, last_used_at=row.last_used_at,
                                expires_at=row.expires_at, current=row.prefix == current_prefix)


def _current_prefix(request: Request) -> str:
    return tokens.lookup_prefix(bearer_token(request.headers.get("authorization")))


@route(bp, "POST", "/v1/tokens", summary="Mint an API token for yourself (its value is shown only in this answer)",
       tag=TAG, request=schemas.ApiTokenCreate, responses={201: schemas.ApiTokenCreated}, errors=(409,))
async def create_token(request: Request) -> HTTPResponse:
    who = await principal(request)
    body = parse_body(request, schemas.ApiTokenCreate)
    minted = await api_tokens.create_token(state(request).sessions, who, body.name, body.expires_in_days)
    log.info("API token %s (%s) minted", minted.row.prefix, minted.row.id)
    view = token_view(minted.row)
    response = respond(schemas.ApiTokenCreated(**view.model_dump(), token=minted.value), status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


@route(bp, "GET", "/v1/tokens", summary="Your API tokens that still work (never their values)", tag=TAG,
       responses={200: schemas.ApiTokenList})
async def list_tokens(request: Request) -> HTTPResponse:
    who = await principal(request)
    rows = await api_tokens.list_tokens(state(request).sessions, who.user_id)
    current = _current_prefix(request)
    return respond(schemas.ApiTokenList(tokens=[token_view(r, current) for r in rows]))


@route(bp, "DELETE", "/v1/tokens/{id}",
       summary="Revoke one of your API tokens (by id, prefix, or a name only it has), and its sign-in",
       tag=TAG, responses={204: None}, errors=(404, 409))
async def revoke_token(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    row = await api_tokens.revoke_token(state(request).sessions, who, id)
    state(request).principals.forget(row.token_hash)
    log.info("API token %s (%s) revoked by its owner", row.prefix, row.id)
    return HTTPResponse(status=204)
