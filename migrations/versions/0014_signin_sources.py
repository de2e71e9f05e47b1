"""sign-ins in progress: the address that started each one (device_grants.source, signin_states.source)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 18:30:00

Expand only: two nullable columns (with an index each) that code of the previous release neither reads
nor writes. The start routes take no credential and the table of sign-ins in progress is bounded: with
the address recorded, one address (an IPv6 client as its /64) gets a bounded share of it, and a full table
makes room from the address holding the most, not from everyone's oldest. Rows from before have NULL and
expire within minutes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    for table in ("device_grants", "signin_states"):
        op.add_column(table, sa.Column("source", sa.String(length=64), nullable=True))
        op.create_index(op.f(f"ix_{table}_source"), table, ["source"], unique=False)


def downgrade() -> None:
    for table in ("device_grants", "signin_states"):
        op.drop_index(op.f(f"ix_{table}_source"), table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("source")
