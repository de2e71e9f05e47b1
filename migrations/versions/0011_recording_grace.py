"""instances.recording_grace_token_hash/_until: a stopped runner's token, for its final recording upload only

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 21:00:00

Expand only: two nullable columns that code of the previous release neither reads nor writes. A stop or
a failure moves the runner token's hash here, accepted by the recording upload route alone until the
time beside it (the provider's bound on how long a stopped runner still runs).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    op.add_column("instances", sa.Column("recording_grace_token_hash", sa.String(length=64), nullable=True))
    op.add_column("instances", sa.Column("recording_grace_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE (as 0009): a batch rebuild of `instances` would cascade into its dependants.
    op.execute("ALTER TABLE instances DROP COLUMN recording_grace_until")
    op.execute("ALTER TABLE instances DROP COLUMN recording_grace_token_hash")
