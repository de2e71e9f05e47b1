"""The producer side: delivery rows written in the same transaction as the session's Event row.

Nothing is sent here. A committed event has its deliveries committed with it (a crash after the
commit loses nothing; a rolled-back transition sends nothing); api/webhooks/delivery.py sends them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api import schemas
from api.db.models import Event, Instance, User, Webhook, WebhookDelivery, new_id

TEST_EVENT = "webhook.test"
_TASK_CHARS = 200


def event_name(event: Event) -> str | None:
    """The webhook event an Event row stands for, or None when no webhook can ask for it."""
    if event.to_state is None:
        return None
    name = f"agent.{event.to_state}" if event.kind == "agent" else f"session.{event.to_state}"
    return name if name in schemas.WEBHOOK_EVENTS else None


async def enqueue(db: AsyncSession, inst: Instance, event: Event, *, agent_message: str | None = None,
                  exit_code: int | None = None) -> None:
    """Add a delivery for each of the owner's webhooks that wants this event (call before the commit).

    ``agent_message``/``exit_code``: the agent's new values for an agent event (``inst`` holds the old)."""
    name = event_name(event)
    if name is None:
        return
    # A disabled owner (they left, or their token leaked) hears nothing more of the sessions they leave behind.
    hooks = (await db.execute(select(Webhook.id, Webhook.format, Webhook.events)
                              .join(User, User.id == Webhook.user_id)
                              .where(Webhook.user_id == inst.user_id, User.is_active.is_(True)))).all()
    wanted = [(hook_id, fmt) for hook_id, fmt, events in hooks if name in (events or ())]
    if not wanted:
        return
    at = event.at
    if name.startswith("agent."):
        agent = {"state": event.to_state, "message": agent_message, "exit_code": exit_code}
    else:
        agent = {"state": inst.agent_state, "message": inst.agent_message, "exit_code": inst.agent_exit_code}
    session = {"id": inst.id, "state": event.to_state if name.startswith("session.") else inst.state,
               "repo_url": inst.repo_url, "branch": inst.branch,
               "task": (inst.task or "")[:_TASK_CHARS] or None, "reason": inst.reason}
    for hook_id, fmt in wanted:
        delivery_id = new_id("whd")
        fields = {"id": delivery_id, "event": name, "at": schemas.wire_time(at), "session": session, "agent": agent,
                  "message": event.message}
        db.add(WebhookDelivery(id=delivery_id, webhook_id=hook_id, event=name, instance_id=inst.id,
                               body=render(fmt, fields), state="pending", attempts=0, next_attempt_at=at,
                               log=[], created_at=at))


def test_delivery(hook: Webhook, at: datetime) -> WebhookDelivery:
    """The ping `POST /v1/webhooks/{id}/test` sends: its own event name, no session."""
    delivery_id = new_id("whd")
    fields = {"id": delivery_id, "event": TEST_EVENT, "at": schemas.wire_time(at), "session": None, "agent": None,
              "message": f"test delivery for webhook {hook.id}", "webhook_id": hook.id}
    return WebhookDelivery(id=delivery_id, webhook_id=hook.id, event=TEST_EVENT, instance_id=None,
                           body=render(hook.format, fields), state="pending", attempts=0, next_attempt_at=at,
                           log=[], created_at=at)


def render(fmt: str, fields: dict[str, Any]) -> str:
    """The request body: Slack's incoming-webhook shape ({"text"}), or the fields plus the same text."""
    text = readable(fields)
    if fmt == "slack":
        return json.dumps({"text": _slack_escape(text)}, separators=(",", ":"))
    return json.dumps({**fields, "text": text}, separators=(",", ":"))


def readable(fields: dict[str, Any]) -> str:
    """One or two lines a person reads in a chat channel."""
    event = fields["event"]
    session = fields.get("session") or {}
    agent = fields.get("agent") or {}
    if event == TEST_EVENT:
        return f"Orzbob Cloud: test delivery for webhook {fields.get('webhook_id')}; it works."
    label = f"Session {session.get('id')}"
    repo = (session.get("repo_url") or "").rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    if repo:
        label += f" ({repo}@{session.get('branch')})" if session.get("branch") else f" ({repo})"
    attach = f"\norz cloud attach {session.get('id')}"
    if event == "agent.needs_input":
        message = agent.get("message")
        return f"{label} needs your input" + (f": {message}" if message else "") + attach
    if event == "agent.idle":
        return f"{label}: the agent is idle (finished its turn)" + attach
    if event == "agent.exited":
        code = agent.get("exit_code")
        return f"{label}: the agent exited" + (f" with code {code}" if code is not None else "")
    if event == "agent.working":
        return f"{label}: the agent is working"
    if event == "session.failed":
        return f"{label} failed: {session.get('reason') or fields.get('message') or 'no reason given'}"
    if event == "session.stopped":
        return f"{label} stopped" + (f": {fields['message']}" if fields.get("message") else "")
    if event == "session.deleted":
        return f"{label} was deleted"
    return f"{label} is {event.removeprefix('session.')}"


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads <...> as links and mentions: the three characters it asks to be escaped.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
