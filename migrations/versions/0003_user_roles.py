"""user roles: `member` (own sessions) or `admin` (all of the org's), beside users.is_admin

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 12:50:00

Expand only: `role` is added and filled from `is_admin`, and `is_admin` stays, kept in step with `role` by
the code (api/db/models.py), so code of the previous release keeps running on this schema during a
rolling upgrade or after a rollback. A later migration may drop `is_admin` once no such code runs.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True


def upgrade() -> None:
    op.add_column("users", sa.Column("role", sa.String(length=16), nullable=False, server_default="member"))
    op.execute(sa.text("UPDATE users SET role = 'admin' WHERE is_admin = :yes").bindparams(yes=True))


def downgrade() -> None:
    op.execute(sa.text("UPDATE users SET is_admin = (role = 'admin')"))
    # Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns in place): a batch rebuild of
    # `users` would drop the table, and with foreign keys on that cascades into tokens and sessions.
    op.execute("ALTER TABLE users DROP COLUMN role")
