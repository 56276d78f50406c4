"""All SQL of the prediction log. Queries are parameterised, always."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from feedback.records import PredictionRecord, created_at, npy_bytes

_INSERT = """
INSERT INTO predictions
    (id, created_at, model_name, model_version, label, label_index, confidence, scores,
     input, request_id, tags)
SELECT id, created_at, model_name, model_version, label, label_index, confidence, scores::real[],
       input, request_id, tags
FROM unnest(
    %s::uuid[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::smallint[], %s::real[],
    %s::text[], %s::bytea[], %s::text[], %s::jsonb[]
) AS u(id, created_at, model_name, model_version, label, label_index, confidence, scores,
       input, request_id, tags)
ON CONFLICT DO NOTHING
"""


def insert_predictions(*, conn: psycopg.Connection, records: Sequence[PredictionRecord]) -> int:
    """Store records in one statement; ids already stored are skipped. Returns rows inserted."""
    if not records:
        return 0
    # real[] per row goes through a text literal: unnest of a 2-D array would flatten it.
    columns: list[list[Any]] = [[] for _ in range(11)]
    for r in records:
        row = (
            r.id,
            r.created_at,
            r.model_name,
            r.model_version,
            r.label,
            r.label_index,
            r.confidence,
            "{" + ",".join(repr(float(s)) for s in r.scores) + "}",
            npy_bytes(r.input),
            r.request_id,
            Jsonb(r.tags),
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    cursor = conn.execute(_INSERT, columns)
    return cursor.rowcount


@dataclass(frozen=True)
class StoredPrediction:
    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    confidence: float
    scores: list[float]
    input: bytes | None
    request_id: str
    tags: dict[str, str]

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
            input=npy_bytes(record.input),
            request_id=record.request_id,
            tags=record.tags,
        )


GET_PREDICTION = (
    "SELECT id, created_at, model_name, model_version, label, confidence, scores, input,"
    " request_id, tags FROM predictions WHERE created_at = %s AND id = %s"
)


def get_prediction(*, conn: psycopg.Connection, prediction_id: uuid.UUID) -> StoredPrediction | None:
    row = conn.execute(GET_PREDICTION, (created_at(prediction_id), prediction_id)).fetchone()
    return None if row is None else StoredPrediction(*row)


async def fetch_prediction(
    *, conn: psycopg.AsyncConnection[Any], prediction_id: uuid.UUID
) -> StoredPrediction | None:
    cursor = await conn.execute(GET_PREDICTION, (created_at(prediction_id), prediction_id))
    row = await cursor.fetchone()
    return None if row is None else StoredPrediction(*row)


def prediction_ids(*, conn: psycopg.Connection) -> list[uuid.UUID]:
    """Every stored id (for consistency checks and tests)."""
    return [row[0] for row in conn.execute("SELECT id FROM predictions")]
