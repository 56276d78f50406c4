"""All SQL of the prediction log. Queries are parameterised, always."""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from feedback.predictions import blobs, partitions
from feedback.predictions.records import PredictionRecord, Row, ShadowRow, created_at

_COLUMNS = (
    "id, created_at, model_name, model_version, label, label_index, confidence, scores, input, request_id, tags,"
    " input_type, input_key, input_size, input_sha256"
)
# The scores column is sent pre-encoded in Postgres's binary real[] format, hence "bytea" here:
# the server reads a binary COPY field by the column's own type.
_COLUMN_TYPES = [
    "uuid",
    "timestamptz",
    "text",
    "text",
    "text",
    "int2",
    "float4",
    "bytea",
    "bytea",
    "text",
    "jsonb",
    "text",
    "text",
    "int4",
    "text",
]
_FLOAT4_OID = 700


def _float4_array(little_endian: bytes) -> bytes:
    """Postgres's binary format of a one-dimensional real[] without nulls."""
    n = len(little_endian) // 4
    cells = np.empty(n, dtype=[("length", ">i4"), ("value", ">f4")])
    cells["length"] = 4
    cells["value"] = np.frombuffer(little_endian, dtype="<f4")
    return struct.pack(">iiiii", 1, 0, _FLOAT4_OID, n, 1) + cells.tobytes()


# A session-private staging table: rows arrive by binary COPY (no per-value text parsing), then
# one INSERT ... SELECT moves them, skipping ids already stored.
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS predictions_staging (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_MOVE = f"INSERT INTO predictions ({_COLUMNS}) SELECT {_COLUMNS} FROM predictions_staging ON CONFLICT DO NOTHING"


_SHADOW_COLUMNS = (
    "prediction_id, created_at, model_name, model_version, label, label_index, confidence, scores, request_id,"
    " answer_ms, shadow_ms"
)
_SHADOW_TYPES = ["uuid", "timestamptz", "text", "text", "text", "int2", "float4", "bytea", "text", "float4", "float4"]
_SHADOW_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS shadow_staging (LIKE shadow_predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_SHADOW_MOVE = (
    f"INSERT INTO shadow_predictions ({_SHADOW_COLUMNS}) SELECT {_SHADOW_COLUMNS} FROM shadow_staging"
    " ON CONFLICT DO NOTHING"
)


def insert_rows(*, conn: psycopg.Connection, rows: Sequence[Row | ShadowRow]) -> int:
    """Store rows (predictions, and shadows' predictions) in one transaction; rows already stored
    are skipped. Returns rows inserted. The days they fall on get partitions first (a day whose
    partition retention dropped since this process last looked gets one again)."""
    days = partitions.days_of(r.created_at for r in rows if isinstance(r, Row))
    partitions.ensure(conn, days)
    try:
        return _insert_rows(conn, rows)
    except psycopg.errors.CheckViolation as exc:
        if "no partition" not in str(exc):
            raise
        partitions.forget(conn)
        partitions.ensure(conn, days)
        return _insert_rows(conn, rows)


def _insert_rows(conn: psycopg.Connection, rows: Sequence[Row | ShadowRow]) -> int:
    predictions = [r for r in rows if isinstance(r, Row)]
    if len(predictions) == len(rows):
        return _insert_predictions(conn, predictions)
    shadows = [r for r in rows if isinstance(r, ShadowRow)]
    with conn.transaction():
        inserted = _insert_predictions(conn, predictions)
        conn.execute(_SHADOW_STAGING)
        with (
            conn.cursor() as cursor,
            cursor.copy(f"COPY shadow_staging ({_SHADOW_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(_SHADOW_TYPES)
            for r in shadows:
                values = (r.id, r.created_at, r.model_name, r.model_version, r.label, r.label_index, r.confidence)
                copy.write_row((*values, _float4_array(r.scores), r.request_id, r.answer_ms, r.shadow_ms))
        return inserted + conn.execute(_SHADOW_MOVE).rowcount


def _insert_predictions(conn: psycopg.Connection, rows: Sequence[Row]) -> int:
    if not rows:
        return 0
    with conn.transaction():
        conn.execute(_STAGING)
        with conn.cursor() as cursor:
            with cursor.copy(f"COPY predictions_staging ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_COLUMN_TYPES)
                for r in rows:
                    copy.write_row(
                        (
                            r.id,
                            r.created_at,
                            r.model_name,
                            r.model_version,
                            r.label,
                            r.label_index,
                            r.confidence,
                            _float4_array(r.scores),
                            r.input_npy,
                            r.request_id,
                            Jsonb(r.tags),
                            r.input_type,
                            r.input_key,
                            r.input_size,
                            r.input_sha256,
                        )
                    )
            return conn.execute(_MOVE).rowcount


@dataclass(frozen=True)
class ShadowPrediction:
    """A shadow's prediction for an answered sample (never answered to anyone)."""

    model_version: str
    label: str
    confidence: float
    scores: list[float]


@dataclass(frozen=True)
class StoredPrediction:
    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    confidence: float
    scores: list[float]
    input: bytes | None  # None once erased
    request_id: str
    tags: dict[str, str]
    input_type: str | None = None  # None: .npy; else the media type of the image as sent
    shadows: tuple[ShadowPrediction, ...] = ()  # what shadows of the model predicted for it (ingested ones)

    @classmethod
    def from_record(cls, record: PredictionRecord) -> StoredPrediction:
        """The row a record becomes once ingested."""
        return cls(
            id=record.id,
            created_at=record.created_at,
            model_name=record.model_name,
            model_version=record.model_version,
            label=record.label,
            confidence=record.confidence,
            scores=[float(s) for s in record.scores],
            input=record.stored_input,
            request_id=record.request_id,
            tags=record.tags,
            input_type=record.input_type,
        )


GET_PREDICTION = (
    "SELECT id, created_at, model_name, model_version, label, confidence, scores, input,"
    " request_id, tags, input_type, input_key FROM predictions WHERE created_at = %s AND id = %s"
)


def get_prediction(*, conn: psycopg.Connection, prediction_id: uuid.UUID) -> StoredPrediction | None:
    """The stored prediction, its input read from the object store where it is kept there."""
    row = conn.execute(GET_PREDICTION, (created_at(prediction_id), prediction_id)).fetchone()
    if row is None:
        return None
    return _stored(row, blobs.read(conn, row[7], row[11]))


def _stored(row: tuple[Any, ...], data: bytes | None) -> StoredPrediction:
    """A row of `GET_PREDICTION` with its input's bytes."""
    return StoredPrediction(
        id=row[0], created_at=row[1], model_name=row[2], model_version=row[3], label=row[4], confidence=row[5],
        scores=row[6], input=data, request_id=row[8], tags=row[9], input_type=row[10],
    )  # fmt: skip


GET_SHADOWS = (
    "SELECT model_version, label, confidence, scores FROM shadow_predictions"
    " WHERE created_at = %s AND prediction_id = %s ORDER BY ingested_at"
)


async def fetch_prediction(*, conn: psycopg.AsyncConnection[Any], prediction_id: uuid.UUID) -> StoredPrediction | None:
    """The stored prediction with its shadows' predictions, or None."""
    key = (created_at(prediction_id), prediction_id)
    row = await (await conn.execute(GET_PREDICTION, key)).fetchone()
    if row is None:
        return None
    shadows = await (await conn.execute(GET_SHADOWS, key)).fetchall()
    data = row[7] if row[11] is None else await asyncio.to_thread(blobs.read, conn, None, row[11])
    return replace(_stored(row, data), shadows=tuple(ShadowPrediction(*s) for s in shadows))


def prediction_ids(*, conn: psycopg.Connection) -> list[uuid.UUID]:
    """Every stored id (for consistency checks and tests)."""
    return [row[0] for row in conn.execute("SELECT id FROM predictions")]


def logged(*, conn: psycopg.Connection, item_ids: Sequence[str], model_name: str | None = None) -> dict[str, uuid.UUID]:
    """Which of a dataset version's row ids are logged predictions ({row id: prediction id}), looked
    up by the log's key (time and id); with `model_name`, that model's own predictions only. Rows of
    original data have ids of their own and are passed over."""
    ids = []
    for item in item_ids:
        try:
            ids.append(uuid.UUID(item))
        except ValueError:
            continue
    rows = conn.execute(
        "SELECT p.id FROM predictions p JOIN unnest(%(c)s::timestamptz[], %(i)s::uuid[]) AS u(c, i)"
        " ON p.created_at = u.c AND p.id = u.i"
        " WHERE %(m)s::text IS NULL OR (p.model_name = %(m)s AND p.source = 'model')",
        {"c": [created_at(i) for i in ids], "i": ids, "m": model_name},
    ).fetchall()
    return {str(r[0]): r[0] for r in rows}
