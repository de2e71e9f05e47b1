"""/v1/auth: sign-in through the platform. The CLI talks only to these routes; the API talks to the
identity provider (device grant, id_token checks) and hands out API and refresh tokens.

Anyone may call the sign-in routes, so each client address gets ``signin_rate_limit`` attempts per
``auth_fail_window_s`` (counted by api/failed_auth.py in the database, shared by API replicas): starting
a sign-in and the Go CLI's exchange always count, polls and refreshes and browser callbacks when refused
(slow_down included; a poll at the interval still waiting for approval does not). Beyond the limit: 429
with Retry-After.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sanic import Blueprint, HTTPResponse, Request

from api import failed_auth, schemas
from api.addresses import client_address
from api.auth import bearer_token
from api.db import tokens
from api.db.models import Org
from api.errors import AuthorizationPending, BadRequest, OrzError, TooManyAttempts
from api.http import parse_body, respond
from api.openapi import route
from api.routes.deps import principal, require_service, state
from api.signin.service import SignInService, TokenPair

bp = Blueprint("auth")
TAG = "auth"


def _service(request: Request) -> SignInService:
    svc = state(request).signin
    assert svc is not None
    return svc


def _address(request: Request, forwarded: str | None = None) -> str:
    """The caller's address; ``forwarded``: the address the web door saw (its own calls carry it)."""
    if forwarded:
        return forwarded
    return client_address(request.ip, request.headers.get("x-forwarded-for"), state(request).settings.api_proxies())


def _too_many(reply: schemas.AuthFailureReply) -> TooManyAttempts:
    return TooManyAttempts(f"too many sign-in attempts from your address; try again in {reply.retry_after_s} s",
                           retry_after_s=reply.retry_after_s)


async def _count_attempt(request: Request, address: str) -> None:
    """Count one sign-in attempt from ``address``; beyond the limit it is refused (429)."""
    st = state(request)
    reply = await failed_auth.record(st.sessions, failed_auth.signin_source(address), st.settings,
                                     limit=st.settings.signin_rate_limit)
    if reply.failures > reply.limit:
        raise _too_many(reply)


async def _count_refusals(request: Request, address: str, attempt: Callable[[], Awaitable[TokenPair]]) -> TokenPair:
    """Run ``attempt`` unless ``address`` is at the limit; count it when it is refused (a guessed code or
    token, a poll faster than the interval), not while a device sign-in waits for approval."""
    st = state(request)
    reply = await failed_auth.check(st.sessions, failed_auth.signin_source(address), st.settings,
                                    limit=st.settings.signin_rate_limit)
    if reply.retry_after_s:
        raise _too_many(reply)
    try:
        return await attempt()
    except AuthorizationPending:
        raise
    except OrzError as exc:  # slow_down too: a client that keeps polling faster than asked is hammering
        if 400 <= exc.status < 500:
            await failed_auth.record(st.sessions, failed_auth.signin_source(address), st.settings,
                                     limit=st.settings.signin_rate_limit)
        raise


def _grant(pair: TokenPair) -> HTTPResponse:
    grant = schemas.TokenGrant(access_token=pair.access_token, expires_in=pair.expires_in,
                               refresh_token=pair.refresh_token, source=pair.source)
    response = respond(grant)
    response.headers["Cache-Control"] = "no-store"  # RFC 6749 5.1
    return response


@route(bp, "GET", "/v1/auth/providers", summary="The identity providers this server signs people in with",
       tag=TAG, responses={200: schemas.SignInProviders}, security=None)
async def providers(request: Request) -> HTTPResponse:
    return respond(schemas.SignInProviders(providers=list(_service(request).providers)))


@route(bp, "POST", "/v1/auth/device", summary="Start a device sign-in (RFC 8628): a code for the person to approve",
       tag=TAG, request=schemas.DeviceAuthorizationRequest, responses={200: schemas.DeviceAuthorization},
       errors=(404, 429, 502, 503), security=None, body_required=False)
async def start_device(request: Request) -> HTTPResponse:
    body = parse_body(request, schemas.DeviceAuthorizationRequest, allow_empty=True)
    address = _address(request)
    await _count_attempt(request, address)
    started = await _service(request).start_device(body.provider, source=address)
    response = respond(schemas.DeviceAuthorization(**started.__dict__))
    response.headers["Cache-Control"] = "no-store"
    return response


@route(bp, "POST", "/v1/auth/token", summary="Poll a device sign-in, or refresh: an API token and a refresh token",
       tag=TAG, request=schemas.TokenRequest, responses={200: schemas.TokenGrant},
       errors=(403, 404, 429, 502, 503), security=None)
async def token(request: Request) -> HTTPResponse:
    body = parse_body(request, schemas.TokenRequest)
    return _grant(await _count_refusals(request, _address(request), lambda: _redeem(_service(request), body)))


async def _redeem(svc: SignInService, body: schemas.TokenRequest) -> TokenPair:
    if body.grant_type == "refresh_token":
        if not body.refresh_token:
            raise BadRequest("refresh_token is required with grant_type refresh_token")
        return await svc.refresh(body.refresh_token)
    if not body.device_code:
        raise BadRequest("device_code is required with the device_code grant type")
    return await svc.poll_device(body.device_code)


@route(bp, "POST", "/v1/auth/revoke", summary="Log out: revoke this API token and its refresh tokens", tag=TAG,
       responses={204: None})
async def revoke(request: Request) -> HTTPResponse:
    await principal(request)  # only a valid token can revoke itself
    value = bearer_token(request.headers.get("authorization"))
    await _service(request).revoke(value)
    state(request).principals.forget(tokens.digest(value))
    return HTTPResponse(status=204)


@route(bp, "POST", "/v1/auth/exchange", summary="The Go CLI's login: a GitHub token for an API token", tag=TAG,
       request=schemas.GoExchangeRequest, responses={200: schemas.GoExchange}, errors=(403, 404, 429, 502, 503),
       security=None)
async def exchange(request: Request) -> HTTPResponse:
    body = parse_body(request, schemas.GoExchangeRequest)
    await _count_attempt(request, _address(request))
    pair = await _service(request).exchange_github(body.github_token, body.github_id)
    user = pair.user
    async with state(request).sessions() as db:
        org = await db.get(Org, user.org_id)
    assert org is not None
    return respond(schemas.GoExchange(token=pair.access_token, user=schemas.GoExchangeUser(
        id=user.id, login=pair.login or body.github_login, email=user.email, org_id=org.id, plan=org.plan)))


@route(bp, "POST", "/internal/v1/signin/start", summary="Gateway: start a browser sign-in (code + PKCE)",
       tag="internal", request=schemas.BrowserSignInStart, responses={200: schemas.BrowserSignInRedirect},
       errors=(404, 429, 502), security="service_token")
async def browser_start(request: Request) -> HTTPResponse:
    require_service(request)
    body = parse_body(request, schemas.BrowserSignInStart)
    address = _address(request, body.source_address)
    await _count_attempt(request, address)
    url, signin_state = await _service(request).start_browser(body.redirect_uri, body.provider, source=address,
                                                              page_nonce=body.page_nonce)
    return respond(schemas.BrowserSignInRedirect(authorization_url=url, state=signin_state))


@route(bp, "POST", "/internal/v1/signin/finish", summary="Gateway: finish a browser sign-in: an API token",
       tag="internal", request=schemas.BrowserSignInFinish, responses={200: schemas.BrowserSignInGrant},
       errors=(403, 404, 429, 502), security="service_token")
async def browser_finish(request: Request) -> HTTPResponse:
    require_service(request)
    body = parse_body(request, schemas.BrowserSignInFinish)
    svc = _service(request)
    pair = await _count_refusals(request, _address(request, body.source_address),
                                 lambda: svc.finish_browser(body.state, body.code, body.redirect_uri))
    response = respond(schemas.BrowserSignInGrant(access_token=pair.access_token, expires_in=pair.expires_in,
                                                  source=pair.source, page_nonce=pair.page_nonce))
    response.headers["Cache-Control"] = "no-store"
    return response
