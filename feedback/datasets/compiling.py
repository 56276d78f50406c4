"""Compiling a training version: the original training rows and every item whose current label as
of a watermark is one of the model's classes, merged in id order and written as a new version.

Left out, and counted in the manifest: discarded, disputed and unreviewed items, erased inputs,
inputs of another shape or kind, labels outside the schema, validation items and any input equal
to one. The same labels at the same watermark give the same version.
"""

from __future__ import annotations

import heapq
import logging
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg

from feedback.datasets import store
from feedback.datasets.schema import Blob, Input, LabelSchema, Originals, Progress, input_key
from feedback.datasets.store import DatasetVersion, Kind
from feedback.datasets.versions import CHUNK, FORMAT, Chunk, read_version, record, write_version
from feedback.errors import Conflict, Invalid
from feedback.review.users import User
from feedback.review.weighting import UNWEIGHTED, Weighting, settle
from models import images
from models.npy import NpyDecoder
from models.provenance import code_version

logger = logging.getLogger(__name__)

# (item id, source, label, revision, input or None, stored bytes or None, stored media type), in id order
Row = tuple[str, str, str, int | None, Input | None, bytes | None, str | None]


def compile_training(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    originals: Originals | None,
    validation: DatasetVersion,
    root_url: str,
    watermark: int | None = None,
    actor: User | None = None,
    progress: Progress | None = None,
    weighting: Weighting = UNWEIGHTED,
) -> DatasetVersion:
    """Compile the training version at `watermark` (default: every settled annotation).

    Rows: the original training rows (unless `originals` is None) and every item whose current
    label as of the watermark is a class of `schema`, left out when discarded, disputed or
    unreviewed, when its input was erased or is not the model's kind (a tensor of its shape, or an
    image in one of its formats), or equals a validation input, or was drawn for the live validation
    set. Only the items of `model_name` (and
    samples reviewers added for it) are read. With `weighting` enabled, disputed items take the
    label weighted by reviewer reliability where it is at least `weighting.min_confidence` likely
    (`feedback.review.weighting`); the others stay out, for an admin.
    """
    if not conn.autocommit:
        raise ValueError("compile_training needs a connection in autocommit mode (it opens its own transactions)")
    watermark = _watermark(conn, watermark)
    if validation.kind is not Kind.VALIDATION:
        raise Invalid(f"{validation.id} is a {validation.kind.value} version, not a validation version")
    held_out = read_version(validation.uri)
    held_out_ids = set(held_out.item_ids) | store.live_drawn_ids(
        conn=conn, model_name=model_name
    )  # the live validation sample too
    held_out_inputs = {input_key(x) for x in held_out.raw}
    skipped: Counter[str] = Counter()
    manifest = _manifest(model_name, schema, watermark, validation, originals)
    weighted: dict[uuid.UUID, str] = {}
    if weighting.enabled:
        settlement = settle(
            conn=conn, model_name=model_name, watermark=watermark, min_confidence=weighting.min_confidence
        )
        weighted = settlement.labels
        manifest["aggregation"] = settlement.manifest()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        expected = store.count_labelled(conn=conn, model_name=model_name, watermark=watermark) + len(weighted)
        if originals is not None:
            expected += len(originals.train)
        sources: list[Iterator[Row]] = [labelled(conn, model_name, watermark, weighted)]
        if originals is not None:
            sources.append(_original(originals))
        merged = heapq.merge(*sources, key=lambda row: row[0])
        rows = accepted_chunks(
            merged, schema=schema, held_ids=held_out_ids, held_inputs=held_out_inputs, skipped=skipped
        )
        manifest["skipped"] = skipped  # filled in while the rows are written
        written = write_version(
            rows, schema=schema, manifest=manifest, root_url=root_url, progress=progress, expected=expected
        )
    logger.info(
        "compiled training version %s: %d rows at watermark %d (skipped: %s)",
        written.id,
        written.rows,
        watermark,
        dict(skipped) or "none",
    )
    return record(conn, written, Kind.TRAINING, model_name, actor=actor, watermark=watermark, validation=validation)


def _watermark(conn: psycopg.Connection, watermark: int | None) -> int:
    """`watermark` checked against the settled one, which it defaults to."""
    settled = store.settled_watermark(conn=conn)
    if watermark is None:
        return settled
    if watermark < 0:
        raise Invalid(f"watermark {watermark} is not an annotation revision")
    if watermark > settled:  # a revision to come, or one not settled yet: the state, not the request
        raise Conflict(f"watermark {watermark} is not a settled annotation revision (0..{settled})")
    return watermark


def _manifest(
    model_name: str, schema: LabelSchema, watermark: int, validation: DatasetVersion, originals: Originals | None
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "kind": Kind.TRAINING.value,
        "model_name": model_name,
        "watermark": watermark,
        "validation_id": validation.id,
        "seed": originals.seed if originals is not None else None,
        "label_schema": schema.to_dict(),
        "filters": {
            "labels": "current label as of the watermark (status 'reviewed')",
            "excluded": [
                "discarded, disputed and unreviewed items",
                "items whose input was erased",
                "inputs of another shape or kind",
                "labels outside the label schema",
                "validation items and any input equal to a validation input",
            ],
            "original": None if originals is None else {"name": originals.name, "split_id": originals.split_id},
        },
        "aggregation": {"method": "agreement", "rule": "every counted verdict agrees; disputes wait for an admin"},
        "code_version": code_version(),
    }


def labelled(
    conn: psycopg.Connection, model_name: str, watermark: int, weighted: Mapping[uuid.UUID, str] | None = None
) -> Iterator[Row]:
    """The model's labelled items as of `watermark`, in id order, inputs as stored."""
    for item in store.labelled_items(conn=conn, model_name=model_name, watermark=watermark, weighted=weighted):
        yield str(item.id), item.source, item.label, item.revision, None, item.input, item.input_type


def _original(originals: Originals) -> Iterator[Row]:
    rows = originals.train
    for i in sorted(range(len(rows)), key=lambda i: rows.ids[i]):
        yield rows.ids[i], "original", rows.labels[i], None, rows.inputs[i], None, None


def accepted_chunks(
    rows: Iterator[Row],
    *,
    schema: LabelSchema,
    held_ids: set[str],
    held_inputs: set[bytes],
    skipped: Counter[str],
) -> Iterator[Chunk]:
    """The rows a version of `schema` takes, in chunks, inputs decoded; the others counted in `skipped`
    by reason."""
    classes = set(schema.class_names)
    decoder = NpyDecoder(schema.input_shape)
    accepted = set() if schema.image is None else {images.MEDIA_TYPES[f] for f in schema.image.formats}
    chunk = Chunk()
    for item_id, source, label, revision, given, stored, media_type in rows:
        if label not in classes:
            skipped["label outside the schema"] += 1
            continue
        value: Input | None = given
        if value is None and schema.image is None:
            value = None if media_type is not None else decoder.decode(stored or b"")
        elif value is None:
            value = Blob(stored, media_type) if stored and media_type in accepted else None
        if value is None:
            skipped["input of another shape or kind"] += 1
            continue
        if item_id in held_ids or input_key(value) in held_inputs:
            skipped["validation item or equal to one"] += 1
            continue
        chunk.ids.append(item_id)
        chunk.sources.append(source)
        chunk.labels.append(label)
        chunk.revisions.append(revision)
        chunk.inputs.append(value)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = Chunk()
    if len(chunk):
        yield chunk
