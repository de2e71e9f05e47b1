"""recordings, recording_chunks: sessions' pane recordings, uploaded by their runners, stored in the database

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 20:00:00

Expand only: two new tables no older code reads. A recording is a row in ``recordings`` (which part is
current, its size) and its bytes in ``recording_chunks``, one row per upload, so appending never rewrites
what is stored. Both go with their session (ON DELETE CASCADE; deleting a session deletes them first).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("part_id", sa.String(length=64), nullable=False),
        sa.Column("part_no", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("previous_part_id", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], name=op.f("fk_recordings_instance_id_instances"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("instance_id", name=op.f("pk_recordings")),
    )
    op.create_table(
        "recording_chunks",
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("part_no", sa.Integer(), nullable=False),
        sa.Column("byte_offset", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"],
                                name=op.f("fk_recording_chunks_instance_id_instances"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("instance_id", "part_no", "byte_offset", name=op.f("pk_recording_chunks")),
    )


def downgrade() -> None:
    op.drop_table("recording_chunks")
    op.drop_table("recordings")
