"""Likely label errors: labels flipped in the digits model's original rows and wrong labels given by a
reviewer are ranked far above chance by confident learning on out-of-sample probabilities; the
reviewable ones are offered by the `suspect` review order, most likely first, to reviewers who
never judged them; a second reviewer's verdict flows into the next version as any other."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest

from feedback import review as rs
from feedback import suspects
from feedback.datasets import (
    LabelSchema,
    Originals,
    Rows,
    bundled_originals,
    compile_training,
    freeze_validation,
    read_version,
)
from feedback.ids import compose_uuid7
from feedback.predictions import store as log_store
from feedback.predictions.records import Row
from feedback.review.moderation import Verdict
from feedback.review.verdicts import record_outside
from models import builtin, digits
from models.npy import npy_bytes
from models.train import TrainConfig

pytestmark = pytest.mark.data

NAME = builtin.DEFAULT_MODEL_NAME
SCHEMA = LabelSchema(class_names=digits.CLASS_NAMES, input_shape=digits.INPUT_SHAPE)
FLIPPED_SHARE = 0.05
LOGGED, WRONGLY_JUDGED = 60, 12


def flipped(label: str, rng: np.random.Generator) -> str:
    return str((int(label) + 1 + int(rng.integers(9))) % 10)


def log(conn: psycopg.Connection, inputs: list[np.ndarray], labels: list[str]) -> list[uuid.UUID]:
    """Predictions of the model (right ones) with these inputs, logged a minute apart an hour ago."""
    start, rows, ids = datetime.now(UTC) - timedelta(hours=1), [], []
    for i, (x, label) in enumerate(zip(inputs, labels, strict=True)):
        ms = round((start + timedelta(minutes=i)).timestamp() * 1000)
        item = compose_uuid7(ms, 0, i + 1)
        scores = np.full(10, 0.01, dtype="<f4")
        scores[int(label)] = 0.91
        when = datetime.fromtimestamp(ms / 1000, UTC)
        rows.append(Row(item, when, NAME, "v1", label, int(label), 0.91, scores.tobytes(), npy_bytes(x), "", {}))
        ids.append(item)
    log_store.insert_rows(conn=conn, rows=rows)
    return ids


def test_injected_label_errors_are_ranked_first_and_offered_for_review(
    conn: psycopg.Connection, split_path: Path, tmp_path: Path
) -> None:
    found = bundled_originals(NAME, split_path)
    assert found is not None
    rng = np.random.default_rng(11)
    train = found.train
    # The first LOGGED rows become logged predictions, judged by a reviewer (WRONGLY_JUDGED of them
    # wrongly); in the other rows, FLIPPED_SHARE of the labels are flipped.
    kept = range(LOGGED, len(train))
    flips = {int(i) for i in rng.choice(kept, round(FLIPPED_SHARE * len(kept)), replace=False)}
    labels = tuple(flipped(train.labels[i], rng) if i in flips else train.labels[i] for i in kept)
    noisy = Originals(found.name, found.split_id, found.seed,
                      Rows(tuple(train.ids[i] for i in kept), labels, [train.inputs[i] for i in kept]),
                      found.validation)  # fmt: skip
    logged = log(conn, [np.asarray(train.inputs[i]) for i in range(LOGGED)], list(train.labels[:LOGGED]))
    first, _ = rs.create_user(conn=conn, name="first", role=rs.Role.REVIEWER)
    wrong = set(logged[:WRONGLY_JUDGED])
    for i, item in enumerate(logged):
        verdict, label = (Verdict.WRONG, flipped(train.labels[i], rng)) if item in wrong else (Verdict.CORRECT, None)
        record_outside(conn=conn, user=first, prediction_id=item, verdict=verdict, label=label, reason="t")

    root = str(tmp_path / "ds")
    validation = freeze_validation(conn=conn, model_name=NAME, originals=noisy, schema=SCHEMA, root_url=root)
    version = compile_training(conn=conn, model_name=NAME, schema=SCHEMA, originals=noisy, validation=validation,
                               root_url=root)  # fmt: skip
    injected = {train.ids[i] for i in flips} | {str(i) for i in wrong}
    assert version.rows == len(kept) + LOGGED

    ranking = suspects.find(conn=conn, model_name=NAME, dataset=version, config=TrainConfig(epochs=10), folds=3)
    top = [s.item_id for s in ranking.suspects[: len(injected)]]
    precision = len(set(top) & injected) / len(injected)
    chance = len(injected) / version.rows
    assert precision >= 0.6 > 5 * chance  # far above chance (0.06 here)
    truths = {train.ids[i]: train.labels[i] for i in flips}
    suggested = [s.suggested == truths[s.item_id] for s in ranking.suspects if s.item_id in truths]
    assert sum(suggested) / len(suggested) >= 0.8  # and the label suggested is mostly the true one
    assert [s.rank for s in suspects.listed(conn=conn, model_name=NAME, limit=5)] == [1, 2, 3, 4, 5]

    # The reviewable suspects, most likely first, to a reviewer who never judged them; not to `first`.
    reviewable = [s.prediction_id for s in ranking.suspects if s.prediction_id is not None]
    assert len(wrong & set(reviewable)) >= WRONGLY_JUDGED * 2 // 3 and len(reviewable) <= 50
    assert rs.claim(conn=conn, user=first, count=50, strategy=rs.Strategy.SUSPECT, lease_seconds=60) == []
    second, _ = rs.create_user(conn=conn, name="second", role=rs.Role.REVIEWER)
    claimed = rs.claim(conn=conn, user=second, count=50, strategy=rs.Strategy.SUSPECT, lease_seconds=60)
    assert [c.prediction_id for c in claimed] == reviewable
    third, _ = rs.create_user(conn=conn, name="third", role=rs.Role.REVIEWER)
    assert rs.claim(conn=conn, user=third, count=50, strategy=rs.Strategy.SUSPECT, lease_seconds=60) == []

    # `second` gives the true labels: where `first` was wrong the item is disputed; an admin settles
    # it, and the next version has the true label. Judged again, nothing is offered any more.
    truth_of = {item: train.labels[i] for i, item in enumerate(logged)}
    verdicts = [
        rs.VerdictIn(c.prediction_id, Verdict.CORRECT if truth_of[c.prediction_id] == c.label else Verdict.WRONG,
                     None if truth_of[c.prediction_id] == c.label else truth_of[c.prediction_id])
        for c in claimed
    ]  # fmt: skip
    rs.record_verdicts(conn=conn, user=second, verdicts=verdicts)
    admin, _ = rs.create_user(conn=conn, name="boss", role=rs.Role.ADMIN)
    for item in wrong & set(reviewable):
        rs.resolve(conn=conn, user=admin, prediction_id=item, label=truth_of[item], reason="second opinion")
    assert rs.claim(conn=conn, user=third, count=50, strategy=rs.Strategy.SUSPECT, lease_seconds=60) == []
    after = read_version(compile_training(conn=conn, model_name=NAME, schema=SCHEMA, originals=noisy,
                                          validation=validation, root_url=root).uri)  # fmt: skip
    labelled = {i: digits.CLASS_NAMES[int(k)] for i, k in zip(after.item_ids, after.labels, strict=True)}
    assert all(labelled[str(item)] == truth_of[item] for item in wrong & set(reviewable))
