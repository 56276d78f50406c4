"""Live model health, reading: the hourly sketches of a period added into windows of any whole
number of hours and compared with each version's reference; the segments that drifted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg

from feedback.datasets import live
from feedback.datasets.store import DatasetVersion
from feedback.health.folding import EPOCH, WINDOW_S, _merge, reference, window_start
from models import health, store

# -- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One version's predictions in one window, against its reference."""

    start: datetime
    end: datetime
    model_version: str
    count: int
    labels: dict[str, int]
    shifts: list[health.Shift]
    estimated: health.Estimate | None
    judged: health.Estimate | None
    judged_count: int
    disagree: bool

    @property
    def alarms(self) -> list[str]:
        return [s.kind for s in self.shifts if s.alarm]


@dataclass(frozen=True)
class Report:
    model_name: str
    window_s: int
    alpha: float
    references: dict[str, dict[str, Any]]  # by version: validation id, samples, accuracy there
    windows: list[Window]


def report(
    conn: psycopg.Connection,
    *,
    model_name: str,
    class_names: tuple[str, ...],
    since: datetime,
    until: datetime,
    window_s: int = WINDOW_S,
    alpha: float = 0.01,
) -> Report:
    """The windows of `window_s` (a whole number of hours) from `since` to `until`, oldest first."""
    rows = conn.execute(
        "SELECT model_version, window_start, validation_id, sketch FROM health_windows"
        " WHERE model_name = %s AND window_start >= %s AND window_start < %s ORDER BY window_start",
        (model_name, window_start(since), until),
    ).fetchall()
    summed: dict[tuple[str, datetime], tuple[str, health.Sketch]] = {}
    for version, hour, validation_id, raw in rows:
        key = (version, window_start(hour, window_s))
        sketch = health.Sketch.from_dict(raw)
        before = summed.get(key)
        merged = sketch if before is None else _merge(before[0], before[1], validation_id, sketch)
        summed[key] = (validation_id, merged)
    references = _references(conn, model_name, {(v, i) for (v, _), (i, _) in summed.items()})
    judged = _judged(conn, model_name, since, until, window_s)
    windows = []
    for (version, start), (validation_id, sketch) in sorted(summed.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = references.get((version, validation_id))
        correct, wrong = judged.get((version, start), (0, 0))
        estimated = None if ref is None else health.estimated_accuracy(ref, sketch)
        judged_accuracy = health.judged_accuracy(correct, wrong)
        windows.append(
            Window(
                start=start,
                end=start + timedelta(seconds=window_s),
                model_version=version,
                count=sketch.count,
                labels={name: int(n) for name, n in zip(class_names, sketch.labels.tolist(), strict=False) if n},
                shifts=[] if ref is None or not sketch.features else health.shifts(ref, sketch, alpha=alpha),
                estimated=estimated,
                judged=judged_accuracy,
                judged_count=correct + wrong,
                disagree=health.disagree(estimated, judged_accuracy),
            )
        )
    on_live = live.current_live(conn=conn, model_name=model_name)
    described = {
        version: {
            "validation_id": vid,
            "samples": ref.samples,
            "accuracy": ref.accuracy,
            **_live(conn, model_name, version, on_live),
        }
        for (version, vid), ref in references.items()
    }
    return Report(model_name, window_s, alpha, described, windows)


def _live(conn: psycopg.Connection, model_name: str, version: str, found: DatasetVersion | None) -> dict[str, Any]:
    """The version's figures on the model's live validation version `found`, beside the original's."""
    if found is None:
        return {"live_validation_id": None, "live_samples": None, "live_accuracy": None}
    try:
        on_live = reference(conn, store.get(f"{model_name}:{version}"), found)
    except store.ModelNotFound:
        on_live = None
    return {
        "live_validation_id": found.id,
        "live_samples": None if on_live is None else on_live[1].samples,
        "live_accuracy": None if on_live is None else on_live[1].accuracy,
    }


def _references(
    conn: psycopg.Connection, model_name: str, wanted: set[tuple[str, str]]
) -> dict[tuple[str, str], health.Reference]:
    if not wanted:
        return {}
    rows = conn.execute(
        "SELECT model_version, validation_id, reference FROM health_references WHERE model_name = %s",
        (model_name,),
    ).fetchall()
    return {(r[0], r[1]): health.Reference.from_dict(r[2]) for r in rows if (r[0], r[1]) in wanted}


def _judged(
    conn: psycopg.Connection, model_name: str, since: datetime, until: datetime, window_s: int
) -> dict[tuple[str, datetime], tuple[int, int]]:
    """(right, wrong) by reviewers' settled labels, per version and window."""
    rows = conn.execute(
        "SELECT p.model_version, date_bin(%s, p.created_at, %s) AS w, count(*) FILTER (WHERE s.label = p.label),"
        " count(*) FILTER (WHERE s.label <> p.label) FROM review_state s JOIN predictions p"
        " ON p.created_at = s.item_created_at AND p.id = s.prediction_id"
        " WHERE p.model_name = %s AND p.source = 'model' AND s.status = 'reviewed'"
        " AND p.created_at >= %s AND p.created_at < %s GROUP BY 1, 2",
        (timedelta(seconds=window_s), EPOCH, model_name, window_start(since), until),
    ).fetchall()
    return {(r[0], r[1]): (int(r[2]), int(r[3])) for r in rows}


def drifted_segments(conn: psycopg.Connection, *, hours: int = 24, now: datetime | None = None) -> list[str]:
    """The segments ("model/label") whose share of the last `hours` of predictions rose against their
    version's reference, most first (by the ratio of the shares; labels the reference never predicted
    rank by their count): where reviewers learn most about a drift (`Strategy.DRIFT`)."""
    now = now or datetime.now(UTC)
    rows = conn.execute(
        "SELECT w.model_name, w.model_version, w.sketch -> 'labels', r.reference -> 'labels' FROM health_windows w"
        " JOIN health_references r ON r.model_name = w.model_name AND r.model_version = w.model_version"
        " AND r.validation_id = w.validation_id WHERE w.window_start >= %s",
        (window_start(now - timedelta(hours=hours)),),
    ).fetchall()
    seen: dict[tuple[str, str], tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
    for model, version, labels, reference_labels in rows:
        counts, ref = np.array(labels, dtype=np.float64), np.array(reference_labels, dtype=np.float64)
        before = seen.get((model, version))
        seen[(model, version)] = (counts if before is None else before[0] + counts, ref)
    ranked: list[tuple[float, str]] = []
    for (model, version), (counts, ref) in seen.items():
        try:
            classes = store.get(f"{model}:{version}").card.signature.class_names
        except store.ModelNotFound:
            continue
        share, expected = counts / max(counts.sum(), 1), ref / max(ref.sum(), 1)
        for i, name in enumerate(classes[: len(share)]):
            ratio = share[i] / expected[i] if expected[i] > 0 else (math.inf if share[i] > 0 else 0.0)
            if ratio > 1:
                ranked.append((ratio, f"{model}/{name}"))
    ranked.sort(key=lambda r: -r[0])
    return list(dict.fromkeys(segment for _, segment in ranked))
