"""orgs.recording_enabled: whether an org's sessions record their agent's pane (on by default)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 19:00:00

Expand only: a column with a server default that code of the previous release neither reads nor writes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    op.add_column("orgs", sa.Column("recording_enabled", sa.Boolean(), nullable=False, server_default="1"))


def downgrade() -> None:
    # Plain ALTER TABLE (as 0003, 0007): a batch rebuild of `orgs` would cascade into users and sessions.
    op.execute("ALTER TABLE orgs DROP COLUMN recording_enabled")
