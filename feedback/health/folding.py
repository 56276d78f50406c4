"""Live model health, folding: the health job puts each prediction, once, into hourly sketches.

The health job (`advance`, run by the ingest workers' upkeep) takes the predictions a model made
since its cursor, up to `delay_s` ago (so that rows still on their way through the stream are
waited for), an hour of them a pass: it counts each version's labels and confidence bins in
Postgres, reads back a uniform random sample of inputs for their features (binned on the
version's reference), draws the live validation sample, and adds it all to each version's hourly
sketch (`models.health.Sketch`). One worker folds a model at a time (the cursor's row lock), and
the cursor moves in the same transaction as the sketches, so every prediction is counted once. A
prediction that reaches Postgres more than `delay_s` late (replayed from a spool after an outage)
is not counted.

A version's reference (`models.health.Reference`) is its run over the model's current validation
version, computed once and kept (`reference`), or a window of its own predictions a team picked
(`choose_reference`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from feedback.datasets import live
from feedback.datasets.store import DatasetVersion, current_validation
from feedback.datasets.versions import read_version
from feedback.errors import Invalid
from feedback.predictions import blobs
from models import health, store
from models.evaluate import evaluate_stored
from models.spec import ImageInput

logger = logging.getLogger(__name__)

WINDOW_S = 3600  # the stored sketches are hourly; a report's windows are whole hours
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class HealthConfig:
    delay_s: float = 60.0  # predictions younger than this wait for the next pass
    lookback_s: float = 48 * 3600.0  # where a model's first pass starts
    inputs_per_pass: int = 2000  # a version's inputs read back for their features in a pass (a random sample)
    images_per_pass: int = 200  # the same for images, which are decoded
    live_share: float = 0.0  # of the predictions drawn for the live validation set (`feedback.datasets.live`)


# -- references -----------------------------------------------------------------------------------


def reference(
    conn: psycopg.Connection, stored: store.StoredModel, validation: DatasetVersion | None = None
) -> tuple[str, health.Reference] | None:
    """The version's reference on `validation` (default: the model's current validation version),
    computed once and kept, with that version's id; None while the model has no validation version."""
    if validation is None:
        chosen = _chosen(conn, stored)
        if chosen is not None:
            return chosen
    validation = validation or current_validation(conn=conn, model_name=stored.name)
    if validation is None:
        return None
    row = conn.execute(
        "SELECT reference FROM health_references WHERE model_name = %s AND model_version = %s AND validation_id = %s",
        (stored.name, stored.version, validation.id),
    ).fetchone()
    if row is not None:
        return validation.id, health.Reference.from_dict(row[0])
    loaded = read_version(validation.uri)
    _, probabilities = evaluate_stored(stored, loaded.inputs, loaded.labels)
    spec = stored.card.model_spec.input
    raw = [blob.data for blob in loaded.blobs] if loaded.blobs is not None else None
    features = health.input_features(spec, raw) if raw is not None else health.tensor_features(loaded.inputs)
    found = health.Reference.of(probabilities, loaded.labels, features, health.feature_names(spec))
    conn.execute(
        "INSERT INTO health_references (model_name, model_version, validation_id, reference) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (stored.name, stored.version, validation.id, Jsonb(found.to_dict())),
    )
    logger.info("health reference of %s on %s: %d samples", stored.tag, validation.id, found.samples)
    return validation.id, found


def _chosen(conn: psycopg.Connection, stored: store.StoredModel) -> tuple[str, health.Reference] | None:
    """The window reference the team picked for the model, if it has one for this version."""
    row = conn.execute(
        "SELECT c.reference_id, r.reference FROM health_reference_choice c JOIN health_references r"
        " ON r.model_name = c.model_name AND r.validation_id = c.reference_id"
        " WHERE c.model_name = %s AND r.model_version = %s",
        (stored.name, stored.version),
    ).fetchone()
    return None if row is None else (row[0], health.Reference.from_dict(row[1]))


def choose_reference(
    conn: psycopg.Connection,
    *,
    model_name: str,
    since: datetime | None,
    until: datetime | None,
    sample: int = 5000,
) -> list[str]:
    """Compare the model's health windows, from the next pass on, with its own predictions of
    [since, until): each version that made some there gets that window's reference (its labels and
    confidence counted, the features of a random sample of `sample` inputs, the calibration of its
    validation version's reference); the versions that did. `since` None: the validation version again."""
    with conn.transaction():
        if since is None or until is None:
            conn.execute("DELETE FROM health_reference_choice WHERE model_name = %s", (model_name,))
            return []
        if until <= since:
            raise Invalid(f"the reference window ends ({until}) before it starts ({since})")
        reference_id = f"window:{since.isoformat()}/{until.isoformat()}"
        span = _span(model_name, since, until)
        counts = conn.execute(_COUNTS, span).fetchall()
        chosen = []
        for version in sorted({c[0] for c in counts}):
            try:
                stored = store.get(f"{model_name}:{version}")
            except store.ModelNotFound:
                continue
            classes = len(stored.card.signature.class_names)
            labels = np.zeros(classes, dtype=np.int64)
            confidence = np.zeros(health.CONFIDENCE_BINS, dtype=np.int64)
            for _, _, label, bin_, n in (c for c in counts if c[0] == version):
                labels[label] += n
                confidence[bin_] += n
            share = min(1.0, sample / max(1, int(labels.sum())))
            rows = conn.execute(_SAMPLE, {**span, "version": version, "below": int(share * _RANDOM_BITS)}).fetchall()
            inputs = [data for data in (blobs.read(conn, r[1], r[2]) for r in rows) if data]
            spec = stored.card.model_spec.input
            features = health.input_features(spec, inputs)
            validation = current_validation(conn=conn, model_name=model_name)
            calibrated_by = None if validation is None else reference(conn, stored, validation)
            by = None if calibrated_by is None else calibrated_by[1]
            names = health.feature_names(spec)
            found = health.Reference.of_window(labels, confidence, features, names, calibrated_by=by)
            conn.execute(
                "INSERT INTO health_references (model_name, model_version, validation_id, reference)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (model_name, model_version, validation_id)"
                " DO UPDATE SET reference = excluded.reference, computed_at = now()",
                (model_name, version, reference_id, Jsonb(found.to_dict())),
            )
            chosen.append(version)
        if not chosen:
            raise Invalid(f"{model_name} made no predictions of a stored version from {since} to {until}")
        conn.execute(
            "INSERT INTO health_reference_choice (model_name, reference_id) VALUES (%s, %s)"
            " ON CONFLICT (model_name) DO UPDATE SET reference_id = excluded.reference_id, chosen_at = now()",
            (model_name, reference_id),
        )
    logger.info("health of %s compared with %s from now on (versions %s)", model_name, reference_id, chosen)
    return chosen


# -- the job --------------------------------------------------------------------------------------


def advance(
    conn: psycopg.Connection, *, model_name: str, config: HealthConfig | None = None, now: datetime | None = None
) -> int | None:
    """One pass for `model_name`: fold up to an hour of its predictions past the cursor into the
    hourly sketches. Returns the predictions folded (0 when caught up), None when another worker
    holds the model."""
    config = config or HealthConfig()
    now = now or datetime.now(UTC)
    with conn.transaction():
        conn.execute(
            "INSERT INTO health_cursors (model_name, processed_until) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (model_name, now - timedelta(seconds=config.lookback_s)),
        )
        row = conn.execute(
            "SELECT processed_until FROM health_cursors WHERE model_name = %s FOR UPDATE SKIP LOCKED", (model_name,)
        ).fetchone()
        if row is None:
            return None
        start: datetime = row[0]
        until = min(now - timedelta(seconds=config.delay_s), start + timedelta(seconds=WINDOW_S))
        if until <= start:
            return 0
        live.draw(conn, model_name=model_name, start=start, until=until, share=config.live_share)
        folder = _Folder(conn, model_name, config)
        span = _span(model_name, start, until)
        counts = conn.execute(_COUNTS, span).fetchall()
        folder.count(counts)
        for version in {c[0] for c in counts}:
            stored, found = folder.reference_of(version)
            if stored is None or found is None:
                continue
            total = sum(c[4] for c in counts if c[0] == version)
            share = min(1.0, folder.inputs_per_pass(stored) / total)
            sample = {**span, "version": version, "below": int(share * _RANDOM_BITS)}
            folder.features(stored, found, conn.execute(_SAMPLE, sample).fetchall())
        folder.save()
        conn.execute("UPDATE health_cursors SET processed_until = %s WHERE model_name = %s", (until, model_name))
    return folder.folded


def _span(model_name: str, start: datetime, until: datetime) -> dict[str, Any]:
    """The parameters of `_COUNTS` and `_SAMPLE`: a model's predictions of [start, until)."""
    return {"model": model_name, "start": start, "until": until, "hour": timedelta(seconds=WINDOW_S), "epoch": EPOCH}


# Each version's predictions of a pass, counted by hour, label and confidence bin in Postgres.
_COUNTS = (
    "SELECT model_version, date_bin(%(hour)s, created_at, %(epoch)s), label_index,"
    f" least(floor(confidence * {health.CONFIDENCE_BINS})::int, {health.CONFIDENCE_BINS - 1}), count(*)"
    " FROM predictions WHERE model_name = %(model)s AND source = 'model'"
    " AND created_at >= %(start)s AND created_at < %(until)s GROUP BY 1, 2, 3, 4"
)
# A uniform random sample of a version's inputs in a pass: a UUIDv7 ends in random bits.
_RANDOM_BITS = 1 << 32
_SAMPLE = (
    "SELECT created_at, input, input_key FROM predictions WHERE model_name = %(model)s AND source = 'model'"
    " AND model_version = %(version)s AND created_at >= %(start)s AND created_at < %(until)s"
    " AND ('x' || right(id::text, 8))::bit(32)::bigint < %(below)s"
)


def advance_all(conn: psycopg.Connection, *, config: HealthConfig, stop: threading.Event | None = None) -> int:
    """Passes for every model in the store until each is caught up (or `stop` is set); the
    predictions folded."""
    folded = 0
    for name in sorted({stored.name for stored in store.list_models()}):
        while not (stop is not None and stop.is_set()):
            done = advance(conn, model_name=name, config=config)
            if done is None:
                break
            folded += done
            if not done and not _behind(conn, name, config):
                break
    if folded:
        logger.info("health: %d predictions folded into the windows", folded)
    return folded


def _behind(conn: psycopg.Connection, model_name: str, config: HealthConfig) -> bool:
    """Whether the cursor is more than a pass behind (an empty hour was passed over)."""
    row = conn.execute("SELECT processed_until FROM health_cursors WHERE model_name = %s", (model_name,)).fetchone()
    edge = datetime.now(UTC) - timedelta(seconds=config.delay_s + WINDOW_S)
    return row is not None and row[0] < edge


def window_start(at: datetime, window_s: int = WINDOW_S) -> datetime:
    return EPOCH + timedelta(seconds=(at - EPOCH).total_seconds() // window_s * window_s)


@dataclass
class _Folder:
    """The sketches of one pass, by (version, hour), before they are added to the stored ones."""

    conn: psycopg.Connection
    model_name: str
    config: HealthConfig
    folded: int = 0
    sketches: dict[tuple[str, datetime], tuple[str, health.Sketch]] = field(default_factory=dict)
    references: dict[str, tuple[store.StoredModel | None, tuple[str, health.Reference] | None]] = field(
        default_factory=dict
    )

    def reference_of(self, version: str) -> tuple[store.StoredModel | None, tuple[str, health.Reference] | None]:
        """The stored version and its reference (None, None: not in this store; counted without inputs)."""
        if version not in self.references:
            try:
                stored = store.get(f"{self.model_name}:{version}")
            except store.ModelNotFound:
                stored = None
            self.references[version] = (stored, None if stored is None else reference(self.conn, stored))
        return self.references[version]

    def inputs_per_pass(self, stored: store.StoredModel) -> int:
        image = isinstance(stored.card.model_spec.input, ImageInput)  # decoding images is the costly part
        return self.config.images_per_pass if image else self.config.inputs_per_pass

    def count(self, counts: list[tuple[Any, ...]]) -> None:
        """Add (version, hour, label index, confidence bin, count) rows to the sketches."""
        for version, hour, label, bin_, n in counts:
            stored, found = self.reference_of(version)
            classes = 0 if stored is None else len(stored.card.signature.class_names)
            _, sketch = self._sketch(version, hour, classes, found)
            if label >= len(sketch.labels):
                sketch.labels = np.pad(sketch.labels, (0, label + 1 - len(sketch.labels)))
            sketch.labels[label] += n
            sketch.confidence[bin_] += n
            sketch.count += n
            self.folded += n

    def _sketch(
        self, version: str, hour: datetime, classes: int, found: tuple[str, health.Reference] | None
    ) -> tuple[str, health.Sketch]:
        key = (version, hour)
        if key not in self.sketches:
            empty = health.Sketch(labels=np.zeros(classes, dtype=np.int64))
            if found is not None:
                empty.features = [np.zeros(len(edges) + 1, dtype=np.int64) for edges in found[1].edges]
            self.sketches[key] = ("" if found is None else found[0], empty)
        return self.sketches[key]

    def features(
        self, stored: store.StoredModel, found: tuple[str, health.Reference], rows: list[tuple[Any, ...]]
    ) -> None:
        """Add the input features of a sample of `stored`'s predictions (created_at, input, key)."""
        by_hour: dict[datetime, list[bytes]] = {}
        for created_at, data, key in rows:
            read = blobs.read(self.conn, data, key)
            if read:  # an erased input is not counted
                by_hour.setdefault(window_start(created_at), []).append(read)
        spec, ref = stored.card.model_spec.input, found[1]
        for hour, inputs in by_hour.items():
            _, sketch = self._sketch(stored.version, hour, len(ref.labels), found)
            added = ref.sketch(np.zeros(0), np.zeros(0), health.input_features(spec, inputs))
            sketch.features = [a + b for a, b in zip(sketch.features, added.features, strict=True)]

    def save(self) -> None:
        for (version, hour), (validation_id, folded) in self.sketches.items():
            sketch = folded
            row = self.conn.execute(
                "SELECT validation_id, sketch FROM health_windows"
                " WHERE model_name = %s AND window_start = %s AND model_version = %s FOR UPDATE",
                (self.model_name, hour, version),
            ).fetchone()
            if row is not None:
                sketch = _merge(row[0], health.Sketch.from_dict(row[1]), validation_id, sketch)
            self.conn.execute(
                "INSERT INTO health_windows (model_name, model_version, window_start, validation_id, sketch)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (model_name, window_start, model_version)"
                " DO UPDATE SET validation_id = excluded.validation_id, sketch = excluded.sketch, updated_at = now()",
                (self.model_name, version, hour, validation_id, Jsonb(sketch.to_dict())),
            )


def _merge(old_id: str, old: health.Sketch, new_id: str, new: health.Sketch) -> health.Sketch:
    """Two sketches of one hour; when the reference changed between them, the inputs' bins differ
    and only the newer sketch's input counts are kept."""
    if old_id == new_id:
        return old + new
    return health.Sketch(old.count + new.count, old.labels + new.labels, old.confidence + new.confidence, new.features)
