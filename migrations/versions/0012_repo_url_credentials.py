"""Credentials out of stored repository URLs: instances.repo_url, events.message, webhook_deliveries.body

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 11:40:00

Expand only (data, no schema). The API refuses a repo_url with a user name or password since 2026-12-05:
it was kept with the session and shown to the org's admins, in events and webhook bodies. Sessions made
before hold them still; this takes them out: every user name and password of an http(s), git or file URL,
and the password of an ssh:// URL (its user name is no secret), wherever such a URL was stored. The
rewrite is written here, not imported, so that it stays what this revision did. There is no way back: the
downgrade leaves the URLs as they are now.
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
expand_only: bool = True

# Stops at whitespace and the JSON/quoting characters around a URL in a message or a webhook body.
_USERINFO = re.compile(r"""\b((?:https?|git|file)://)[^\s/?#@"'\\]*@""", re.IGNORECASE)
_SSH_PASSWORD = re.compile(r"""\b(ssh://[^\s/?#@:"'\\]*):[^\s/?#@"'\\]*@""", re.IGNORECASE)
# (table, key column, text column): where a session's repo_url was written
_COLUMNS = (("instances", "id", "repo_url"), ("events", "id", "message"), ("webhook_deliveries", "id", "body"))


def without_credentials(text: str) -> str:
    return _SSH_PASSWORD.sub(r"\1@", _USERINFO.sub(r"\1", text))


def upgrade() -> None:
    bind = op.get_bind()
    for table, key, column in _COLUMNS:
        rows = bind.execute(sa.text(f"SELECT {key}, {column} FROM {table} "  # noqa: S608  # nosec B608
                                    f"WHERE {column} LIKE '%://%@%'")).all()
        for row_key, value in rows:
            if (clean := without_credentials(value)) != value:
                bind.execute(sa.text(f"UPDATE {table} SET {column} = :clean "  # noqa: S608  # nosec B608
                                     f"WHERE {key} = :key"), {"clean": clean, "key": row_key})


def downgrade() -> None:
    pass  # the credentials are gone for good; the URLs without them serve the previous release as well
