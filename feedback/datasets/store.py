"""All SQL of the data sets: labelled items as of a watermark, and the registry of dataset versions.

Functions take a connection and keyword arguments; queries are parameterised, always.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from feedback.predictions import blobs
from feedback.review.audit import audit
from feedback.review.moderation import Annotation, Status, Verdict, decide
from feedback.review.users import User


class Kind(StrEnum):
    TRAINING = "training"  # compiled from current labels (and the original data) for retraining
    VALIDATION = "validation"  # frozen; changed only by an explicit admin action
    ORIGINAL = "original"  # the training side of a model's imported original data
    LIVE_VALIDATION = "live_validation"  # judged items of a random share of live traffic (`feedback.datasets.live`)


@dataclass(frozen=True)
class LabelledItem:
    """A reviewed item's label as of a watermark, with its input: .npy bytes, or an image as sent."""

    id: uuid.UUID
    source: str  # 'model' or 'reviewer'
    label: str
    revision: int
    input: bytes
    input_type: str | None  # None: .npy; else the image's media type


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    kind: Kind
    model_name: str
    uri: str
    watermark: int | None
    validation_id: str | None
    parent_id: str | None
    rows: int
    per_class: dict[str, int]
    manifest: dict[str, Any]
    created_by: str | None
    created_at: datetime


# -- labelled items -------------------------------------------------------------------------------


def settled_watermark(*, conn: psycopg.Connection) -> int:
    """The highest annotation revision below which nothing can still appear.

    Revisions come from a sequence, so a transaction may commit revision 11 while 10 is still in
    flight; a compile at 11 would then miss 10 and differ from a later compile at 11. The short
    SHARE lock waits for writers in flight, so every revision up to the one returned is committed.
    """
    with conn.transaction():
        conn.execute("LOCK TABLE annotations IN SHARE MODE")
        row = conn.execute("SELECT coalesce(max(id), 0) FROM annotations").fetchone()
    assert row is not None
    return int(row[0])


# The items of a model: its predictions, and the samples reviewers added for it (or, from before
# samples were kept per model, for no model in particular).
_OF_MODEL = "p.model_name IN (%(m)s, 'reviewer')"


def count_labelled(*, conn: psycopg.Connection, model_name: str, watermark: int) -> int:
    """An upper bound of the items `labelled_items` yields (for progress output)."""
    row = conn.execute(
        "SELECT count(*) FROM review_state s JOIN predictions p ON p.created_at = s.item_created_at"
        f" AND p.id = s.prediction_id WHERE {_OF_MODEL}"
        " AND ((s.status = 'reviewed' AND s.revision <= %(w)s) OR s.revision > %(w)s)",
        {"w": watermark, "m": model_name},
    ).fetchone()
    assert row is not None
    return int(row[0])


_HAS_INPUT = "(p.input IS NOT NULL OR p.input_key IS NOT NULL)"  # in the row, or in the object store

_SETTLED = f"""
    SELECT s.prediction_id, p.source, s.label, s.revision, p.input, p.input_type, p.input_key
    FROM review_state s
    JOIN predictions p ON p.created_at = s.item_created_at AND p.id = s.prediction_id
    WHERE (s.status = 'reviewed' OR (s.status = 'disputed' AND s.prediction_id = ANY(%(d)s::uuid[])))
      AND s.revision <= %(w)s AND {_HAS_INPUT} AND {_OF_MODEL}
    ORDER BY s.prediction_id
"""

# Items annotated again after the watermark: their state at the watermark is decided anew from the
# annotations up to it, with the same rules that made the projection.
_CHANGED_SINCE = f"""
    SELECT s.prediction_id, p.source, p.label, s.required_reviews, p.input, p.input_type,
           h.revisions, h.actors, h.verdicts, h.labels, p.input_key
    FROM review_state s
    JOIN predictions p ON p.created_at = s.item_created_at AND p.id = s.prediction_id
    CROSS JOIN LATERAL (
        SELECT array_agg(a.id ORDER BY a.id) AS revisions, array_agg(a.actor_id ORDER BY a.id) AS actors,
               array_agg(a.verdict ORDER BY a.id) AS verdicts, array_agg(a.label ORDER BY a.id) AS labels
        FROM annotations a WHERE a.prediction_id = s.prediction_id AND a.id <= %(w)s
    ) h
    WHERE s.revision > %(w)s AND {_HAS_INPUT} AND h.revisions IS NOT NULL AND {_OF_MODEL}
    ORDER BY s.prediction_id
"""


def labelled_items(
    *,
    conn: psycopg.Connection,
    model_name: str,
    watermark: int,
    weighted: Mapping[uuid.UUID, str] | None = None,
    chunk: int = 20_000,
) -> Iterator[LabelledItem]:
    """Every item of `model_name` with a current label as of `watermark` and an input, in id order, streamed.

    `weighted` labels items that are disputed as of the watermark (`feedback.review.weighting`).
    Call inside a REPEATABLE READ transaction: both cursors then read one snapshot.
    """
    weighted = weighted or {}
    params = {"w": watermark, "m": model_name, "d": list(weighted)}
    settled = _rows(conn, _SETTLED, params, chunk)
    changed = _rows(conn, _CHANGED_SINCE, params, chunk)
    a, b = next(settled, None), next(changed, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            data = blobs.read(conn, a[4], a[6])
            assert data is not None
            label = a[2] if a[2] is not None else weighted[a[0]]
            yield LabelledItem(id=a[0], source=a[1], label=label, revision=int(a[3]), input=data, input_type=a[5])
            a = next(settled, None)
            continue
        history = [
            Annotation(revision=int(r), actor_id=int(u), verdict=Verdict(v), label=lab)
            for r, u, v, lab in zip(b[6], b[7], b[8], b[9], strict=True)
        ]
        decision = decide(history, predicted=b[2], required=int(b[3]))
        label = decision.label if decision.status is Status.REVIEWED else None
        if decision.status is Status.DISPUTED:
            label = weighted.get(b[0])
        if label is not None:
            data = blobs.read(conn, b[4], b[10])
            assert data is not None
            yield LabelledItem(
                id=b[0], source=b[1], label=label, revision=history[-1].revision, input=data, input_type=b[5]
            )
        b = next(changed, None)


def _rows(conn: psycopg.Connection, query: str, params: dict[str, Any], chunk: int) -> Iterator[tuple[Any, ...]]:
    with conn.cursor(name=f"labelled_{uuid.uuid4().hex[:8]}", binary=True) as cursor:
        cursor.itersize = chunk
        cursor.execute(query, params)
        yield from cursor


# -- versions -------------------------------------------------------------------------------------

_VERSION_COLUMNS = """v.id, v.kind, v.model_name, v.uri, v.watermark, v.validation_id, v.parent_id, v.rows,
    v.per_class, v.manifest, u.name, v.created_at"""


def record_version(*, conn: psycopg.Connection, version: DatasetVersion, actor: User | None) -> DatasetVersion:
    """Register a compiled version; the same id compiled again keeps its first registration."""
    with conn.transaction():
        inserted = conn.execute(
            """INSERT INTO dataset_versions (id, kind, model_name, uri, watermark, validation_id, parent_id, rows,
                   per_class, manifest, created_by)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id""",
            (
                version.id,
                version.kind.value,
                version.model_name,
                version.uri,
                version.watermark,
                version.validation_id,
                version.parent_id,
                version.rows,
                Jsonb(version.per_class),
                Jsonb(version.manifest),
                actor.id if actor else None,
            ),
        ).fetchone()
        if inserted is not None:
            audit(conn, actor, f"{version.kind.value}.compile", version.id, rows=version.rows, uri=version.uri)
    found = get_version(conn=conn, version_id=version.id)
    assert found is not None
    return found


def get_version(*, conn: psycopg.Connection, version_id: str) -> DatasetVersion | None:
    row = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM dataset_versions v LEFT JOIN users u ON u.id = v.created_by WHERE v.id = %s",
        (version_id,),
    ).fetchone()
    return None if row is None else _version(row)


def list_versions(*, conn: psycopg.Connection, model_name: str, kind: Kind | None = None) -> list[DatasetVersion]:
    rows = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM dataset_versions v LEFT JOIN users u ON u.id = v.created_by"
        " WHERE v.model_name = %s AND (%s::text IS NULL OR v.kind = %s) ORDER BY v.created_at, v.id",
        (model_name, kind, kind),
    ).fetchall()
    return [_version(r) for r in rows]


def live_drawn_ids(*, conn: psycopg.Connection, model_name: str) -> set[str]:
    """Every item of the model drawn for the live validation set (`feedback.datasets.live`): none of
    them may enter a training version."""
    rows = conn.execute("SELECT prediction_id FROM live_validation_items WHERE model_name = %s", (model_name,))
    return {str(r[0]) for r in rows}


def current_validation(*, conn: psycopg.Connection, model_name: str) -> DatasetVersion | None:
    """The newest validation version of the model: the one every comparison uses."""
    versions = list_versions(conn=conn, model_name=model_name, kind=Kind.VALIDATION)
    return versions[-1] if versions else None


def _version(row: tuple[Any, ...]) -> DatasetVersion:
    return DatasetVersion(
        id=row[0],
        kind=Kind(row[1]),
        model_name=row[2],
        uri=row[3],
        watermark=row[4],
        validation_id=row[5],
        parent_id=row[6],
        rows=int(row[7]),
        per_class={k: int(v) for k, v in row[8].items()},
        manifest=row[9],
        created_by=row[10],
        created_at=row[11],
    )
