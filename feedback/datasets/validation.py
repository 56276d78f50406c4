"""Validation versions: the rows every model of a name is compared on, frozen once and changed only
by an admin's explicit fix, which makes a new version beside the old one.

A model's validation version comes from its original split, or, for a model that came without
data, is drawn once from its judged items (stratified, seeded); its items never enter a training
version.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from feedback.datasets import store
from feedback.datasets.compiling import accepted_chunks, labelled
from feedback.datasets.schema import LabelSchema, Originals, Rows
from feedback.datasets.store import DatasetVersion, Kind
from feedback.datasets.versions import FORMAT, Chunk, chunks_of, read_version, record, write_version
from feedback.errors import Conflict, Invalid, NotFound
from feedback.review.users import User
from models.provenance import code_version

logger = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.2  # of a model's data held out as its frozen validation version
MIN_JUDGED_PER_CLASS = 5  # judged items a class needs before a validation version is drawn from verdicts
MIN_VALIDATION_PER_CLASS = 2  # held out of each class, at the least, when drawing from verdicts


def freeze_validation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    originals: Originals,
    schema: LabelSchema,
    root_url: str,
    actor: User | None = None,
) -> DatasetVersion:
    """The model's validation version, frozen from the original split the first time it is asked for."""
    current = store.current_validation(conn=conn, model_name=model_name)
    if current is not None:
        return current
    if originals.validation is None:
        raise Invalid(f"{model_name}'s original data comes without a validation side to freeze")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.VALIDATION.value,
        "model_name": model_name,
        "label_schema": schema.to_dict(),
        "source": {"original": originals.name, "split_id": originals.split_id, "seed": originals.seed},
        "parent_id": None,
        "fixes": [],
        "code_version": code_version(),
    }
    written = write_version(
        chunks_of(originals.validation),
        schema=schema,
        manifest=manifest,
        root_url=root_url,
        progress=None,
    )
    logger.info("froze validation version %s (%d rows)", written.id, written.rows)
    return record(conn, written, Kind.VALIDATION, model_name, actor=actor)


def freeze_validation_from_verdicts(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    root_url: str,
    seed: int = 0,
    fraction: float = VALIDATION_FRACTION,
    actor: User | None = None,
) -> DatasetVersion:
    """The validation version of a model that came without data, drawn once from its judged items.

    Stratified by current label and seeded: of each class's judged items (in id order, permuted
    by `seed`), `max(MIN_VALIDATION_PER_CLASS, round(fraction * n))` are held out; every class
    needs MIN_JUDGED_PER_CLASS judged items, so at least three of each are left to train on. The
    held-out items never enter a training version (`compile_training` leaves validation items
    and equal inputs out). Like any validation version it is frozen: later verdicts change it
    only through a fix, which makes a new version."""
    current = store.current_validation(conn=conn, model_name=model_name)
    if current is not None:
        return current
    if not conn.autocommit:
        raise ValueError("freeze_validation_from_verdicts needs a connection in autocommit mode")
    watermark = store.settled_watermark(conn=conn)
    judged = judged_items(conn, model_name, schema, watermark)
    held_out = _draw(judged, model_name, schema, seed=seed, fraction=fraction)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": Kind.VALIDATION.value,
        "model_name": model_name,
        "label_schema": schema.to_dict(),
        "source": {
            "verdicts": {
                "watermark": watermark,
                "seed": seed,
                "fraction": fraction,
                "min_per_class": MIN_VALIDATION_PER_CLASS,
                "judged": len(judged),
            },
        },
        "parent_id": None,
        "fixes": [],
        "code_version": code_version(),
    }
    written = write_version([held_out], schema=schema, manifest=manifest, root_url=root_url, progress=None)
    logger.info(
        "froze validation version %s from verdicts: %d of %d judged items", written.id, written.rows, len(judged)
    )
    return record(conn, written, Kind.VALIDATION, model_name, actor=actor)


def judged_items(conn: psycopg.Connection, model_name: str, schema: LabelSchema, watermark: int) -> Chunk:
    """Every item of the model labelled as of `watermark` that a version of `schema` takes, in id order."""
    skipped: Counter[str] = Counter()
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        judged = Chunk()
        for chunk in accepted_chunks(
            labelled(conn, model_name, watermark), schema=schema, held_ids=set(), held_inputs=set(), skipped=skipped
        ):
            judged.extend(chunk)
    return judged


def _draw(judged: Chunk, model_name: str, schema: LabelSchema, *, seed: int, fraction: float) -> Chunk:
    """The held-out rows: a seeded, stratified share of each class, in id order; `Conflict` when a
    class has too few judged items."""
    by_class: dict[str, list[int]] = {name: [] for name in schema.class_names}
    for i, label in enumerate(judged.labels):
        by_class[label].append(i)
    short = {name: len(rows) for name, rows in by_class.items() if len(rows) < MIN_JUDGED_PER_CLASS}
    if short:
        counts = ", ".join(f"{name!r} has {n}" for name, n in short.items())
        raise Conflict(
            f"{model_name} has no validation version and too few judged items to draw one from verdicts "
            f"({counts}; at least {MIN_JUDGED_PER_CLASS} of each class): judge more of its predictions, "
            f"or import its original data with `loop datasets import {model_name} DIR`"
        )
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for rows in by_class.values():
        held = max(MIN_VALIDATION_PER_CLASS, round(fraction * len(rows)))
        chosen.extend(rows[i] for i in rng.permutation(len(rows))[:held])
    chosen.sort(key=lambda i: judged.ids[i])
    held_out = Chunk()
    for i in chosen:
        held_out.append(judged, i)
    return held_out


@dataclass(frozen=True)
class LabelFix:
    item_id: str
    label: str
    reason: str


def fix_validation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    fixes: Sequence[LabelFix],
    schema: LabelSchema,
    root_url: str,
    actor: User,
) -> DatasetVersion:
    """A new validation version with `fixes` applied to the current one, which stays as it was."""
    parent = store.current_validation(conn=conn, model_name=model_name)
    if parent is None:
        raise Conflict(f"{model_name} has no validation version yet; compile a training version first")
    if not fixes:
        raise Invalid("no label fixes given")
    loaded = read_version(parent.uri)
    labels = [schema.class_names[i] for i in loaded.labels]
    position = {item: i for i, item in enumerate(loaded.item_ids)}
    for fix in fixes:
        if fix.item_id not in position:
            raise NotFound(f"{fix.item_id!r} is not in validation version {parent.id}")
        if fix.label not in schema.class_names:
            raise Invalid(f"label {fix.label!r} is not one of {', '.join(schema.class_names)}")
        if not fix.reason.strip():
            raise Invalid(f"a reason is required for the fix of {fix.item_id}")
        if labels[position[fix.item_id]] == fix.label:
            raise Conflict(f"{fix.item_id} is already labelled {fix.label!r}")
        labels[position[fix.item_id]] = fix.label
    manifest = dict(parent.manifest)
    manifest.update(
        parent_id=parent.id,
        fixes=[*parent.manifest.get("fixes", []), *({"item_id": f.item_id, "label": f.label} for f in fixes)],
        code_version=code_version(),
    )
    for key in ("rows", "per_class", "per_source", "files"):
        manifest.pop(key, None)
    written = write_version(
        chunks_of(Rows(tuple(loaded.item_ids), tuple(labels), loaded.raw)),
        schema=schema,
        manifest=manifest,
        root_url=root_url,
        progress=None,
    )
    logger.info("validation version %s replaces %s (%d fixes)", written.id, parent.id, len(fixes))
    return record(conn, written, Kind.VALIDATION, model_name, actor=actor, parent_id=parent.id)
