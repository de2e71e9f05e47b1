"""POST /v1/instances/{id}/attach: short-lived SSH certificate and attach JWT for one session."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncssh
from cryptography.hazmat.primitives.asymmetric import ec
from sanic import Blueprint, HTTPResponse, Request

from api import schemas
from api.auth import Principal
from api.credentials import jwt as attach_jwt
from api.credentials import ssh_ca
from api.db.models import Instance
from api.errors import ValidationFailed
from api.http import parse_body, respond
from api.instances.views import attach_url, ssh_command
from api.openapi import route
from api.routes.deps import gateway_host_keys, principal, state
from api.settings import Settings

bp = Blueprint("attach")
TAG = "instances"


@dataclass(frozen=True)
class AttachKeys:
    ca: asyncssh.SSHKey
    jwt: ec.EllipticCurvePrivateKey


def attach_keys(request: Request) -> AttachKeys:
    """The CA and JWT signing keys, loaded (or generated) once per app."""
    keys: AttachKeys | None = getattr(request.app.ctx, "attach_keys", None)
    if keys is None:
        settings: Settings = state(request).settings
        keys = AttachKeys(ca=ssh_ca.load_or_create_ca(settings),
                          jwt=attach_jwt.load_or_create_signing_key(settings))
        request.app.ctx.attach_keys = keys
    return keys


def attach_token(request: Request, who: Principal, row: Instance) -> str:
    """A fresh single-use attach token for a session object's ``attach_url`` (create and get).

    Nothing is stored: the gateway verifies the signature and the API spends its ``jti`` on first use;
    it lives ``attach_token_ttl_s`` (2 minutes by default). It is never logged."""
    settings = state(request).settings
    return attach_jwt.issue(attach_keys(request).jwt, user_id=who.user_id, session_id=row.id,
                            ttl_s=settings.attach_token_ttl_s).token


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@route(bp, "POST", "/v1/instances/{id}/attach", summary="Get short-lived attach credentials", tag=TAG,
       request=schemas.AttachRequest, responses={200: schemas.AttachGrant}, errors=(403, 404),
       body_required=False)
async def attach(request: Request, id: str) -> HTTPResponse:
    who = await principal(request)
    body = parse_body(request, schemas.AttachRequest, allow_empty=True)
    st = state(request)
    row = await st.instances.get(who, id)  # another org's session is a 404, a colleague's a 403
    request.ctx.session_id = row.id
    settings = st.settings
    keys = attach_keys(request)
    cert: ssh_ca.SignedCertificate | None = None
    ttl_s = settings.cert_ttl_s
    if body.ttl_s is not None:
        if body.ttl_s > settings.longest_cert_ttl_s:
            raise ValidationFailed.of("ttl_s", f"a certificate may last at most {settings.longest_cert_ttl_s} s "
                                      f"on this server, not {body.ttl_s} s "
                                      "(an admin sets the limit: ORZ_CERT_MAX_TTL_S)")
        ttl_s = body.ttl_s
    if body.public_key:
        try:
            cert = ssh_ca.sign_user_certificate(
                keys.ca, body.public_key, session_id=row.id, user_id=who.user_id, ttl_s=ttl_s,
                permit_port_forwarding=settings.permit_port_forwarding, readonly=body.readonly,
            )
        except ssh_ca.CertificateError as exc:
            raise ValidationFailed.of("public_key", str(exc)) from exc
    token = attach_jwt.issue(keys.jwt, user_id=who.user_id, session_id=row.id,
                             ttl_s=settings.attach_token_ttl_s, readonly=body.readonly)
    await st.instances.record_attach_grant(who, row, readonly=body.readonly, certificate=cert is not None)
    return respond(schemas.AttachGrant(
        id=row.id, status=row.state, user=who.user_id,  # type: ignore[arg-type]
        certificate=cert.text if cert else None,
        certificate_expires_at=_utc(cert.valid_before) if cert else None,
        token=token.token, token_expires_at=_utc(token.expires_at),
        ssh=ssh_command(settings, row.id), ssh_host=settings.public_ssh_host, ssh_port=settings.public_ssh_port,
        attach_url=f"{attach_url(settings, row.id)}?token={token.token}", readonly=body.readonly,
        host_keys=gateway_host_keys(request),
    ))
