"""user roles: `member` (own sessions) or `admin` (all of the org's), replacing users.is_admin

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 12:50:00

Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns in place): a batch rebuild of
`users` would drop the table, and with foreign keys on that cascades into tokens, sessions, secrets.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("role", sa.String(length=16), nullable=False, server_default="member"))
    op.execute(sa.text("UPDATE users SET role = 'admin' WHERE is_admin = :yes").bindparams(yes=True))
    op.execute("ALTER TABLE users DROP COLUMN is_admin")


def downgrade() -> None:
    op.add_column("users", sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(sa.text("UPDATE users SET is_admin = :yes WHERE role = 'admin'").bindparams(yes=True))
    op.execute("ALTER TABLE users DROP COLUMN role")
