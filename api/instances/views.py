"""How an instance row is shown to users: the public schema, with the ssh line and attach URL."""

from __future__ import annotations

from urllib.parse import quote

from api import schemas
from api.db.models import Event, Instance
from api.settings import Settings


def ssh_command(settings: Settings, session_id: str) -> str:
    port = "" if settings.public_ssh_port == 22 else f"-p {settings.public_ssh_port} "
    return f"ssh {port}{session_id}@{settings.public_ssh_host}"


def attach_url(settings: Settings, session_id: str) -> str:
    """The WebSocket terminal of a session on the gateway's web door (``ws://`` or ``wss://``)."""
    base = settings.public_web_url or f"ws://{settings.gateway_web_host}:{settings.gateway_web_port}"
    base = base.replace("https://", "wss://").replace("http://", "ws://").rstrip("/")
    return f"{base}/v1/instances/{session_id}/attach"


def session_attach_url(settings: Settings, session_id: str, token: str | None = None) -> str:
    """The same endpoint as a session object shows it: ``http(s)://`` with ``?token=`` when one was minted.

    The earlier Go API and its CLI used this form: the CLI turns ``https`` into ``wss`` and anything else
    into ``ws``, so a ``wss://`` URL would reach a TLS port without TLS."""
    url = attach_url(settings, session_id).replace("wss://", "https://", 1).replace("ws://", "http://", 1)
    return f"{url}?token={quote(token, safe='')}" if token else url


def instance_view(settings: Settings, row: Instance, attach_token: str | None = None) -> schemas.Instance:
    return schemas.Instance(
        id=row.id,
        status=row.state,  # type: ignore[arg-type]
        reason=row.reason,
        tier=row.tier,  # type: ignore[arg-type]
        program=row.program,
        repo_url=row.repo_url,
        branch=row.branch,
        task=row.task,
        secrets=list((row.spec or {}).get("secrets", [])),
        attach_url=session_attach_url(settings, row.id, attach_token),
        ssh=ssh_command(settings, row.id),
        attached_clients=row.attached_clients,
        idle_timeout_s=(row.spec or {}).get("idle_timeout_s"),
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        stopped_at=row.stopped_at,
        last_activity_at=row.last_activity_at,
        agent_state=row.agent_state,  # type: ignore[arg-type]
        agent_message=row.agent_message,
        agent_exit_code=row.agent_exit_code,
        agent_state_at=row.agent_state_at,
        work=schemas.WorkState.model_validate(row.work) if row.work else None,
    )


def event_view(row: Event) -> schemas.InstanceEvent:
    return schemas.InstanceEvent(
        at=row.at, actor=row.actor, kind=row.kind, from_state=row.from_state, to_state=row.to_state,
        message=row.message,
    )
