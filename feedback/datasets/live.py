"""A validation set from today's domain: live validation versions.

The frozen validation version was drawn from the data a model was first trained on; traffic moves
on. The health job draws a uniform random share of each model's predictions (`draw`, on random bits
of their UUIDv7 ids that nothing else uses) into `live_validation_items`. Those items never enter a
training version (`compile_training` holds them out like validation items), reviewers find them
first with the `validation` review order, and once enough are judged `freeze_live_validation`
freezes the judged ones of the last days as a live validation version (kind `live_validation`),
refreshed on a schedule. It stands beside the original validation version: the gate still decides
on the original one, and the health report and every promotion show the accuracy on both.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from feedback.datasets import store
from feedback.datasets.schema import LabelSchema
from feedback.datasets.store import DatasetVersion, Kind
from feedback.datasets.validation import judged_items
from feedback.datasets.versions import FORMAT, Chunk, item_ids, record, write_version
from feedback.review.users import User
from models import store as models_store
from models.provenance import code_version

logger = logging.getLogger(__name__)

SHARE_BITS = 1 << 16

# A prediction is drawn when the 16 random bits that open its id's last group fall below the share
# (the health job's input sample reads the last 8 hex digits: independent bits).
_DRAW = (
    "INSERT INTO live_validation_items (prediction_id, created_at, model_name)"
    " SELECT id, created_at, model_name FROM predictions WHERE model_name = %(model)s AND source = 'model'"
    " AND created_at >= %(start)s AND created_at < %(until)s"
    " AND ('x' || substr(id::text, 25, 4))::bit(16)::int < %(below)s ON CONFLICT DO NOTHING"
)


def draw(conn: psycopg.Connection, *, model_name: str, start: datetime, until: datetime, share: float) -> int:
    """Draw `share` of the model's predictions created in [start, until) into the live sample; how many."""
    if share <= 0:
        return 0
    below = min(SHARE_BITS, round(share * SHARE_BITS))
    return conn.execute(_DRAW, {"model": model_name, "start": start, "until": until, "below": below}).rowcount


def current_live(*, conn: psycopg.Connection, model_name: str) -> DatasetVersion | None:
    versions = store.list_versions(conn=conn, model_name=model_name, kind=Kind.LIVE_VALIDATION)
    return versions[-1] if versions else None


def freeze_live_validation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    root_url: str,
    days: float = 30.0,
    min_judged: int = 100,
    actor: User | None = None,
) -> DatasetVersion | None:
    """A new live validation version of the drawn items of the last `days` that reviewers settled,
    none of them in a training version; None when fewer than `min_judged` are, or when they are the
    items of the current live version already."""
    if not conn.autocommit:
        raise ValueError("freeze_live_validation needs a connection in autocommit mode")
    since = datetime.now(UTC) - timedelta(days=days)
    drawn = {
        str(r[0])
        for r in conn.execute(
            "SELECT prediction_id FROM live_validation_items WHERE model_name = %s AND created_at >= %s",
            (model_name, since),
        )
    }
    trained = set()
    for version in store.list_versions(conn=conn, model_name=model_name, kind=Kind.TRAINING):
        trained.update(item_ids(version.uri))
    watermark = store.settled_watermark(conn=conn)
    judged = judged_items(conn, model_name, schema, watermark)
    held = Chunk()
    for i, item in enumerate(judged.ids):
        if item in drawn and item not in trained:
            held.append(judged, i)
    current = current_live(conn=conn, model_name=model_name)
    if len(held) < min_judged:
        logger.info(
            "%s: %d judged live items, %d needed for a live validation version", model_name, len(held), min_judged
        )
        return None
    if current is not None and sorted(item_ids(current.uri)) == sorted(held.ids):
        return None
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.LIVE_VALIDATION.value,
        "model_name": model_name,
        "label_schema": schema.to_dict(),
        "source": {
            "live": {
                "since": since.isoformat(),
                "watermark": watermark,
                "drawn": len(drawn),
                "left_out_as_trained": len(drawn & trained),
                "judged": len(held),
            }
        },
        "parent_id": None,
        "fixes": [],
        "code_version": code_version(),
    }
    written = write_version([held], schema=schema, manifest=manifest, root_url=root_url, progress=None)
    logger.info("froze live validation version %s of %s: %d judged live items", written.id, model_name, written.rows)
    return record(conn, written, Kind.LIVE_VALIDATION, model_name, actor=actor)


def refresh(
    conn: psycopg.Connection, *, root_url: str, every: timedelta, days: float, min_judged: int
) -> list[DatasetVersion]:
    """A new live validation version of each model of the store whose current one is older than
    `every` (or that has none), where enough new items are judged: the ones frozen."""
    frozen = []
    for name in sorted({stored.name for stored in models_store.list_models()}):
        current = current_live(conn=conn, model_name=name)
        if current is not None and current.created_at > datetime.now(UTC) - every:
            continue
        schema = LabelSchema.of(models_store.get(f"{name}:latest").card.model_spec)
        found = freeze_live_validation(
            conn=conn, model_name=name, schema=schema, root_url=root_url, days=days, min_judged=min_judged
        )
        if found is not None:
            frozen.append(found)
    return frozen
