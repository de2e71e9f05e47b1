"""instances.agent_state/agent_message/agent_exit_code/agent_state_at/work: agent-aware sessions

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 17:00:00

Expand only: nullable columns that code of the previous release neither reads nor writes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True

_COLUMNS = ("agent_state", "agent_message", "agent_exit_code", "agent_state_at", "work")


def upgrade() -> None:
    op.add_column("instances", sa.Column("agent_state", sa.String(length=16), nullable=True))
    op.add_column("instances", sa.Column("agent_message", sa.Text(), nullable=True))
    op.add_column("instances", sa.Column("agent_exit_code", sa.Integer(), nullable=True))
    op.add_column("instances", sa.Column("agent_state_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("instances", sa.Column("work", sa.JSON(), nullable=True))


def downgrade() -> None:
    for name in reversed(_COLUMNS):
        op.execute(f"ALTER TABLE instances DROP COLUMN {name}")
