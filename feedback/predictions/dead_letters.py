"""The dead-letter stream: prediction entries the ingest worker could not decode or store.

Every entry there may be a prediction a client was answered for, so its arrival is an alert:
the ingest worker logs it at error level and counts it (`loop_ingest_dead_total`), the service
exposes the stream's length (`loop_dead_letters`). Entries keep their original fields beside
the reason and their id in the prediction stream. Once the cause is fixed, `replay` moves them
back onto the prediction stream, where the idempotent insert stores each exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from feedback.keys import Keys
from feedback.predictions.records import Fields

REASON = b"reason"  # why the entry was refused
SOURCE_ID = b"source_id"  # its id in the prediction stream
_PAGE = 500


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str  # in the dead-letter stream
    source_id: str
    prediction_id: str | None
    reason: str
    fields: Fields  # as the prediction stream held them

    @classmethod
    def of(cls, entry_id: bytes, raw: Fields) -> DeadLetter:
        fields = {k: v for k, v in raw.items() if k not in (REASON, SOURCE_ID)}
        prediction_id = fields.get(b"id")
        return cls(
            entry_id=entry_id.decode(),
            source_id=raw.get(SOURCE_ID, b"").decode(errors="replace"),
            prediction_id=None if prediction_id is None else prediction_id.decode(errors="replace"),
            reason=raw.get(REASON, b"").decode(errors="replace"),
            fields=fields,
        )


def dead_fields(fields: Fields, *, entry_id: bytes, reason: str) -> Fields:
    """What the dead-letter stream keeps of a refused entry."""
    return {**fields, REASON: reason.encode(), SOURCE_ID: entry_id}


def count(client: redis.Redis, keys: Keys) -> int:
    return int(client.xlen(keys.dead_letters))


def read(client: redis.Redis, keys: Keys, *, limit: int = 100) -> list[DeadLetter]:
    """The oldest `limit` dead letters."""
    entries: Any = client.xrange(keys.dead_letters, count=limit)
    return [DeadLetter.of(entry_id, fields) for entry_id, fields in entries]


def replay(client: redis.Redis, keys: Keys, *, entry_ids: Sequence[str] | None = None) -> int:
    """Move dead letters (all, or those named) back onto the prediction stream; returns how many.

    Each page moves in one MULTI/EXEC (XADD to the stream, XDEL from the dead letters), so an
    entry is never in neither place; the ingest worker's insert skips ids already stored.
    """
    if entry_ids is not None:
        found: list[tuple[bytes, Fields]] = []
        for entry_id in entry_ids:
            one: Any = client.xrange(keys.dead_letters, min=entry_id, max=entry_id)
            if not one:
                raise KeyError(f"no dead letter {entry_id} in {keys.dead_letters}")
            found.extend(one)
        return _move(client, keys, found)
    moved = 0
    while True:
        page: Any = client.xrange(keys.dead_letters, count=_PAGE)
        if not page:
            return moved
        moved += _move(client, keys, page)


def _move(client: redis.Redis, keys: Keys, entries: Sequence[tuple[bytes, Fields]]) -> int:
    pipe = client.pipeline(transaction=True)
    for entry_id, raw in entries:
        letter = DeadLetter.of(entry_id, raw)
        pipe.xadd(keys.stream, letter.fields)  # type: ignore[arg-type]
        pipe.xdel(keys.dead_letters, entry_id)
    pipe.execute()
    return len(entries)
