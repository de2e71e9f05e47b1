"""Sessions' pane recordings in the database, as their runners upload them (docs/security.md#recordings).

One way for every provider: the runner records the pane (runner/recording.py) and uploads the new bytes
every few seconds over the internal API; the API keeps them here and serves them. An upload says which
part it belongs to (the runner's random name for it) and at which byte offset it starts:

- the current part at its current size: appended (one ``recording_chunks`` row, never a rewrite);
- a name that is neither the current nor the previous part, at offset 0: a new part; the current one
  becomes the previous one and the one before that is deleted (a part and the previous one, as on disk);
- anything else (a retry whose first try landed, a runner that lost count): 409 with where the current
  part ends, so the runner sends again from there and nothing is stored twice.

Each part holds at most the API's ``recording_max_bytes`` whatever the runner sends (413 past it), so
a session's recording takes at most twice that in the database, for as long as the session exists.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api import schemas
from api.db.base import utcnow
from api.db.models import Recording, RecordingChunk
from api.errors import BadRequest, Conflict, PayloadTooLarge

# The runner writes each part's header with json.dumps: what a new part's first upload starts with.
PART_START = b'{"version": 2'


def _conflict(detail: str, rec: Recording | None) -> Conflict:
    ack = ack_of(rec)
    return Conflict(detail, part=ack.part, offset=ack.offset)


def ack_of(rec: Recording | None) -> schemas.RecordingAck:
    return schemas.RecordingAck(part=rec.part_id, offset=rec.size) if rec else schemas.RecordingAck(part="", offset=0)


async def append(db: AsyncSession, session_id: str, part: str, offset: int, data: bytes, max_bytes: int
                 ) -> schemas.RecordingAck:
    """Store one upload and commit; raise Conflict (with the server's part and offset) when it does not fit."""
    if not schemas.RECORDING_PART_RE.match(part):
        raise BadRequest("part must be 1 to 64 letters, digits, '-' or '_'")
    if offset < 0:
        raise BadRequest("offset must be 0 or more")
    if not data:
        raise BadRequest("an upload needs a body: the recording's next bytes")
    rec = await db.get(Recording, session_id, populate_existing=True)
    new_part = rec is None or part not in (rec.part_id, rec.previous_part_id)
    if new_part:
        if offset != 0:
            raise _conflict(f"part {part} is not the recording's current part: send it from offset 0", rec)
        if not data.startswith(PART_START):
            raise BadRequest("a new part must start with an asciicast v2 header")
    elif rec is not None and part != rec.part_id:
        raise _conflict(f"part {part} was rotated out: it takes no more bytes", rec)
    elif rec is not None and offset != rec.size:
        raise _conflict(f"the recording's part {part} ends at byte {rec.size}, not {offset}", rec)
    if offset + len(data) > max_bytes:
        raise PayloadTooLarge(f"a recording part holds at most {max_bytes} bytes; start a new part",
                              max_bytes=max_bytes)

    now = utcnow()
    if rec is None:
        part_no = 0
        db.add(Recording(instance_id=session_id, part_id=part, part_no=0, size=len(data), updated_at=now))
    else:
        # Conditional on what was read: of two uploads racing for the same offset, one wins, one gets 409.
        old_part_no, old_part, old_size = rec.part_no, rec.part_id, rec.size
        part_no = old_part_no + 1 if new_part else old_part_no
        values = (dict(part_id=part, part_no=part_no, size=len(data), previous_part_id=old_part)
                  if new_part else dict(size=old_size + len(data)))
        moved = await db.execute(
            update(Recording)
            .where(Recording.instance_id == session_id, Recording.part_id == old_part, Recording.size == old_size)
            .values(updated_at=now, **values), execution_options={"synchronize_session": False})
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            await db.rollback()
            raise _conflict("another upload of this recording landed first", await _fresh(db, session_id))
        if new_part:  # the part before the old current one goes
            await db.execute(delete(RecordingChunk).where(RecordingChunk.instance_id == session_id,
                                                          RecordingChunk.part_no < old_part_no),
                             execution_options={"synchronize_session": False})
    db.add(RecordingChunk(instance_id=session_id, part_no=part_no, byte_offset=offset, data=data))
    try:
        await db.commit()
    except IntegrityError:
        await db.rollback()  # the first upload of two racing ones made the row
        raise _conflict("another upload of this recording landed first", await _fresh(db, session_id)) from None
    return schemas.RecordingAck(part=part, offset=offset + len(data))


async def _fresh(db: AsyncSession, session_id: str) -> Recording | None:
    return await db.get(Recording, session_id, populate_existing=True)


async def read(db: AsyncSession, session_id: str, *, previous: bool = False) -> bytes | None:
    """The current part (or the previous one) as stored; None when there is none."""
    rec = await db.get(Recording, session_id)
    if rec is None or (previous and rec.previous_part_id is None):
        return None
    part_no = rec.part_no - 1 if previous else rec.part_no
    # At most recording_max_bytes (the cap holds per part): read whole.
    chunks = await db.scalars(select(RecordingChunk.data)
                              .where(RecordingChunk.instance_id == session_id, RecordingChunk.part_no == part_no)
                              .order_by(RecordingChunk.byte_offset))
    return b"".join(chunks)


async def delete_all(db: AsyncSession, session_id: str) -> None:
    """Delete a session's recording in the caller's transaction (the session is being deleted)."""
    await db.execute(delete(RecordingChunk).where(RecordingChunk.instance_id == session_id))
    await db.execute(delete(Recording).where(Recording.instance_id == session_id))
