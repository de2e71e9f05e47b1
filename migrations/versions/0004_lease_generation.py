"""scheduler_leases.generation: a fencing token for the leader's writes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 16:30:00

Expand only: a column with a default. Code of the previous release neither reads nor bumps it; its
replicas still change `holder` when they take the lease, which the new code's fence also checks.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    op.add_column("scheduler_leases", sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.execute("ALTER TABLE scheduler_leases DROP COLUMN generation")
