"""Who may reach a session right now: one rule for a new attach and for attachments already live."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api import schemas
from api.db.models import Instance, User
from api.errors import Forbidden, NotFound, OrzError, Unauthorized
from api.instances.states import GONE_STATES, State


def no_such_session(session_id: str) -> NotFound:
    """The 404 for an id the caller gave: echoed when it could be a session id, else only said not to be one
    (a path segment of any length and any characters would otherwise come back in the answer)."""
    if schemas.SESSION_ID_RE.match(session_id):
        return NotFound(f"no such session: {session_id}")
    return NotFound("no such session: that is not a session id (lowercase letters, digits and '-', 1-32 long)")


def refusal(user: User | None, inst: Instance | None, session_id: str) -> OrzError | None:
    """Why `user` may not reach `session_id` now, or None when they may."""
    if user is None:
        return Unauthorized("unknown user")
    if not user.is_active:
        return Forbidden("your account is disabled")
    if inst is None or inst.org_id != user.org_id or State(inst.state) in GONE_STATES:
        return no_such_session(session_id)
    if inst.user_id != user.id and user.role != "admin":
        return Forbidden(f"session {inst.id} belongs to someone else in your org")
    return None


def _live_reason(error: OrzError, session_id: str) -> str:
    """The line an attached user reads: a live session that vanished was deleted, not mistyped."""
    if isinstance(error, NotFound):
        return f"session {session_id} was deleted"
    if isinstance(error, Forbidden) and "disabled" not in error.detail:
        return f"your access to session {session_id} was revoked"
    return error.detail


async def revoked(db: AsyncSession, live: Sequence[schemas.LiveAttachment]) -> list[schemas.RevokedAttachment]:
    """Which live attachments the rule above now refuses: two queries, however many attachments."""
    user_ids = {a.user_id for a in live}
    session_ids = {a.session_id for a in live}
    users = {u.id: u for u in (await db.scalars(select(User).where(User.id.in_(user_ids)))).all()}
    insts = {i.id: i for i in (await db.scalars(select(Instance).where(Instance.id.in_(session_ids)))).all()}
    out: list[schemas.RevokedAttachment] = []
    for a in live:
        error = refusal(users.get(a.user_id), insts.get(a.session_id), a.session_id)
        if error is not None:
            out.append(schemas.RevokedAttachment(session_id=a.session_id, user_id=a.user_id,
                                                 reason=_live_reason(error, a.session_id)))
    return out
