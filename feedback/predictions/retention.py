"""Retention of the prediction log: partitions whose day is past the retention period go whole,
never row by row. An item that must outlive its partition is kept first, in a partition of its
own for the same day (`predictions_kYYYYMMDD`), where it is still found by id:

- it is leased to a reviewer, or under review (verdicts given but not settled, or disputed);
- it is judged and its label is not yet in a training version of its model (its revision is above
  the newest training version's watermark);
- it is in a validation version (`keep`: the ids the caller read from the versions' files).

Dataset versions copy their inputs into their own files, so a compiled item needs nothing here.
Inputs in the object store go with the last row that names them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from feedback.predictions import blobs, partitions
from feedback.predictions.partitions import TABLE, Partition

logger = logging.getLogger(__name__)

_LOCK = 0x72657461  # advisory lock: one retention pass at a time

# Whether the row `p` must outlive its partition (binds `keep`, a uuid[]).
PROTECTED = """(
    p.id = ANY(%(keep)s::uuid[])
    OR EXISTS (SELECT 1 FROM leases l WHERE l.prediction_id = p.id AND l.expires_at > now())
    OR EXISTS (
        SELECT 1 FROM review_state s WHERE s.prediction_id = p.id AND (
            s.status IN ('unreviewed', 'disputed')
            OR (s.status = 'reviewed' AND s.revision > coalesce((
                SELECT max(d.watermark) FROM dataset_versions d
                WHERE d.kind = 'training' AND d.model_name = p.model_name), 0))))
)"""


_GOING_OBJECTS = sql.SQL("SELECT DISTINCT input_key FROM {old} p WHERE input_key IS NOT NULL AND NOT {protected}")


@dataclass(frozen=True)
class Expiring:
    """A partition past the retention period: its rows, and how many of them are kept."""

    partition: Partition
    rows: int
    kept: int

    @property
    def action(self) -> str:
        if self.kept == self.rows:
            return "keep" if self.rows else "drop"
        return "drop" if self.kept == 0 else "keep protected"

    def describe(self) -> str:
        day = "before" if self.partition.low is None else "from"
        since = self.partition.high if self.partition.low is None else self.partition.low
        return (
            f"{self.partition.name} ({day} {since:%Y-%m-%d}): {self.rows} rows, {self.kept} protected -> {self.action}"
        )


def cutoff(keep_days: int, now: datetime | None = None) -> datetime:
    """The start of the oldest UTC day kept: partitions ending at or before it are past retention."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=keep_days), datetime.min.time(), tzinfo=UTC)


def plan(
    conn: psycopg.Connection, *, keep_days: int, keep: Collection[uuid.UUID] = (), now: datetime | None = None
) -> list[Expiring]:
    """What retention would do now: every partition past `keep_days` days, with its counts."""
    edge = cutoff(keep_days, now)
    found = []
    for partition in partitions.partitions(conn):
        if partition.high > edge:
            continue
        row = conn.execute(
            sql.SQL("SELECT count(*), count(*) FILTER (WHERE {protected}) FROM {table} p").format(
                protected=sql.SQL(PROTECTED), table=sql.Identifier(partition.name)
            ),
            {"keep": list(keep)},
        ).fetchone()
        assert row is not None
        found.append(Expiring(partition, rows=int(row[0]), kept=int(row[1])))
    return found


def apply(conn: psycopg.Connection, expiring: Collection[Expiring], *, keep: Collection[uuid.UUID] = ()) -> None:
    """Drop each partition in `expiring` whole, its protected rows first moved to a partition of
    their own for the same day; each partition in its own transaction."""
    columns = sql.SQL(", ").join(map(sql.Identifier, _columns(conn)))
    for expired in expiring:
        if expired.action == "keep":
            continue
        partition = expired.partition
        kept = "predictions_legacy_kept" if partition.low is None else f"predictions_k{partition.low:%Y%m%d}"
        scratch = f"{kept}_next"
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            objects = [  # the inputs of the rows that go: deleted below once no row names them
                r[0]
                for r in conn.execute(
                    sql.SQL(
                        "SELECT DISTINCT input_key FROM {old} p WHERE input_key IS NOT NULL AND NOT {protected}"
                    ).format(old=sql.Identifier(partition.name), protected=sql.SQL(PROTECTED)),
                    {"keep": list(keep)},
                ).fetchall()
            ]
            if expired.kept:
                conn.execute(
                    sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                        sql.Identifier(scratch), sql.Identifier(TABLE)
                    )
                )
                conn.execute(
                    sql.SQL("INSERT INTO {scratch} ({columns}) SELECT {columns} FROM {old} p WHERE {protected}").format(
                        scratch=sql.Identifier(scratch),
                        columns=columns,
                        old=sql.Identifier(partition.name),
                        protected=sql.SQL(PROTECTED),
                    ),
                    {"keep": list(keep)},
                )
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
                    sql.Identifier(TABLE), sql.Identifier(partition.name)
                )
            )
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(partition.name)))
            if expired.kept:
                conn.execute(
                    sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(scratch), sql.Identifier(kept))
                )
                conn.execute(
                    sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(
                        sql.Identifier(TABLE), sql.Identifier(kept), sql.SQL(partition.bound)
                    )
                )
        deleted = blobs.forget_unreferenced(conn, objects)  # after the commit: a failed drop loses nothing
        logger.info("retention: %s; %d objects deleted", expired.describe(), deleted)
    partitions.forget(conn)


def _columns(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum",
        (TABLE,),
    ).fetchall()
    return [r[0] for r in rows]
