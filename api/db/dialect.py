"""What differs between the two supported databases, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def is_postgres(db: AsyncSession) -> bool:
    return db.get_bind().dialect.name == "postgresql"


def insert_for(db: AsyncSession) -> Callable[..., Any]:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING / DO UPDATE on both supported databases."""
    return postgresql.insert if is_postgres(db) else sqlite.insert
