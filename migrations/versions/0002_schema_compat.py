"""schema_compat: which code heads may run on the current schema

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# A new table no older code reads: code at 0001 keeps working on this schema.
expand_only: bool = True


def upgrade() -> None:
    op.create_table(
        "schema_compat",
        sa.Column("schema_revision", sa.String(length=64), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("schema_revision", "head", name=op.f("pk_schema_compat")),
    )


def downgrade() -> None:
    op.drop_table("schema_compat")
