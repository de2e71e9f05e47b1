"""/v1/webhooks: your webhooks, their delivery log and a test ping. The signing secret is shown once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sanic import Blueprint, HTTPResponse, Request

from api import schemas
from api.errors import ValidationFailed
from api.http import parse_body, respond
from api.openapi import QueryParam, route
from api.routes.deps import principal, state
from api.webhooks.service import delivery_view, webhook_view

if TYPE_CHECKING:
    from api.webhooks.service import WebhookService

bp = Blueprint("webhooks")
TAG = "webhooks"


def _service(request: Request) -> WebhookService:
    svc = state(request).webhooks
    assert svc is not None
    return svc


@route(bp, "POST", "/v1/webhooks", summary="Create a webhook (its signing secret is shown only in this answer)",
       tag=TAG, request=schemas.WebhookCreate, responses={201: schemas.WebhookCreated}, errors=(409,))
async def create_webhook(request: Request) -> HTTPResponse:
    who = await principal(request)
    body = parse_body(request, schemas.WebhookCreate)
    return respond(await _service(request).create(who, body), status=201)


@route(bp, "GET", "/v1/webhooks", summary="List your webhooks", tag=TAG, responses={200: schemas.WebhookList})
async def list_webhooks(request: Request) -> HTTPResponse:
    who = await principal(request)
    rows = await _service(request).list(who)
    return respond(schemas.WebhookList(webhooks=[webhook_view(r) for r in rows]))


@route(bp, "GET", "/v1/webhooks/{id}", summary="Get a webhook (never its secret)", tag=TAG,
       responses={200: schemas.Webhook}, errors=(404,))
async def get_webhook(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    return respond(webhook_view(await _service(request).get(who, id)))


@route(bp, "DELETE", "/v1/webhooks/{id}", summary="Delete a webhook and its pending deliveries", tag=TAG,
       responses={204: None}, errors=(404,))
async def delete_webhook(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    await _service(request).delete(who, id)
    return HTTPResponse(status=204)


LIMIT = QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                   "how many deliveries, newest first")


@route(bp, "GET", "/v1/webhooks/{id}/deliveries", summary="The webhook's deliveries, newest first, with each attempt",
       tag=TAG, responses={200: schemas.WebhookDeliveryList}, errors=(404, 422), query=(LIMIT,))
async def list_deliveries(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 200:
        raise ValidationFailed.of("limit", "limit must be a number from 1 to 200")
    rows = await _service(request).deliveries(who, id, int(raw))
    return respond(schemas.WebhookDeliveryList(deliveries=[delivery_view(r) for r in rows]))


@route(bp, "POST", "/v1/webhooks/{id}/test", summary="Send a test delivery now and answer how it went", tag=TAG,
       responses={200: schemas.WebhookDelivery}, errors=(404, 429))
async def test_webhook(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    return respond(delivery_view(await _service(request).test(who, id)))
