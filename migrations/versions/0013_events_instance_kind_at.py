"""events: an index on (instance_id, kind, at) for the per-session questions asked on hot paths

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 16:20:00

Expand only: an index that code of the previous release does not know about. The runner event budget
asks, on each heartbeat that carries an event, how many of the session's runner events fall in the last
minute; the reconciler asks whether a session's OOM kill is recorded on every pass while its Pod shows
one. With only ``instance_id`` indexed both read every event the session ever had, and a runner (the
session's own code) chooses how often the first is asked. The new index starts with ``instance_id``, so it
answers every lookup the old one did, which goes (a planner without statistics kept choosing it).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    op.create_index("ix_events_instance_kind_at", "events", ["instance_id", "kind", "at"])
    op.drop_index("ix_events_instance_id", table_name="events")


def downgrade() -> None:
    op.create_index("ix_events_instance_id", "events", ["instance_id"])
    op.drop_index("ix_events_instance_kind_at", table_name="events")
