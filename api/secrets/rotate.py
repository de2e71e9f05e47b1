"""Re-encrypt every stored secret under the current key, a row at a time, while the API keeps serving.

Each row is rewritten in its own short transaction with a conditional UPDATE (same key id and nonce
as read), so a concurrent replace is never overwritten, and rows not yet rewritten keep decrypting
with their old key id. Keep the old key configured until ``key_usage`` shows no row uses it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.credentials.secrets_box import Sealed, SecretsBox
from api.db.models import Secret
from api.errors import SecretUnreadable
from api.secrets.service import binding

log = logging.getLogger(__name__)

BATCH_SIZE = 50


@dataclass
class RotationReport:
    key_id: str
    rotated: int = 0
    # (secret id, why) for rows that could not be opened; they keep their old ciphertext.
    failed: list[tuple[str, str]] = field(default_factory=list)


async def rotate_all(sessions: async_sessionmaker[AsyncSession], box: SecretsBox, *,
                     batch_size: int = BATCH_SIZE) -> RotationReport:
    """Rewrite every row not under ``box.current_key_id``; unreadable rows are reported, not fatal."""
    target = box.current_key_id
    report = RotationReport(key_id=target)
    after = ""
    while True:
        async with sessions() as db:
            # Keyset paging by id: rows that fail are passed over instead of being read again forever.
            ids = list(await db.scalars(
                select(Secret.id).where(Secret.key_id != target, Secret.id > after)
                .order_by(Secret.id).limit(batch_size)
            ))
        if not ids:
            break
        for secret_id in ids:
            await _rotate_one(sessions, box, secret_id, report)
        after = ids[-1]
        await asyncio.sleep(0)  # let other work on this loop run between batches
    log.info("secrets rotation to key id %s: %d rewritten, %d failed", target, report.rotated, len(report.failed))
    return report


async def _rotate_one(sessions: async_sessionmaker[AsyncSession], box: SecretsBox, secret_id: str,
                      report: RotationReport) -> None:
    async with sessions() as db:
        row = await db.scalar(select(Secret).where(Secret.id == secret_id).with_for_update())
        if row is None or row.key_id == report.key_id:
            return  # deleted or replaced (under the current key) since the batch was listed
        try:
            plaintext = box.open(Sealed(row.key_id, row.nonce, row.ciphertext), binding(row))
        except SecretUnreadable as exc:
            report.failed.append((row.id, exc.detail))
            log.warning("secret %s (%s) not rotated: %s", row.id, row.name, exc.detail)
            return
        sealed = box.seal(plaintext, binding(row))
        result = await db.execute(
            update(Secret)
            .where(Secret.id == row.id, Secret.key_id == row.key_id, Secret.nonce == row.nonce)
            # Rotation is not a change users made: keep updated_at as it was.
            .values(key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext,
                    updated_at=Secret.updated_at)
        )
        await db.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            report.rotated += 1


async def key_usage(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    """How many rows each key id still seals: an old key may be dropped once it is absent here."""
    async with sessions() as db:
        rows = await db.execute(select(Secret.key_id, func.count()).group_by(Secret.key_id))
        return {kid: int(n) for kid, n in rows.all()}
