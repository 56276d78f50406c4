"""Simulated reviewers: items with known true labels logged as a model's predictions, judged by
reviewers who err at set rates, through the same code paths real verdicts take.

The measurement (`python -m experiments.reviewer_quality`) and the tests build on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg

from feedback import review as rs
from feedback.ids import compose_uuid7
from feedback.predictions import store as log_store
from feedback.predictions.records import Row
from feedback.review.moderation import Verdict
from feedback.review.verdicts import record_outside
from models.npy import npy_bytes


@dataclass(frozen=True)
class Reviewer:
    name: str
    error_rate: float  # how often they say another class (drawn uniformly) than the true one


@dataclass(frozen=True)
class Item:
    id: uuid.UUID
    truth: str
    predicted: str


def log_items(
    conn: psycopg.Connection,
    *,
    model_name: str,
    classes: Sequence[str],
    n: int,
    model_accuracy: float,
    rng: np.random.Generator,
    input_shape: tuple[int, ...] = (4,),
) -> list[Item]:
    """`n` predictions of `model_name` with true labels drawn uniformly and the model right with
    `model_accuracy` (else another class), logged an hour ago onwards, in id order."""
    start = datetime.now(UTC) - timedelta(hours=1)
    items, rows = [], []
    for i in range(n):
        truth = int(rng.integers(len(classes)))
        predicted = truth if rng.random() < model_accuracy else int(_other(rng, len(classes), truth))
        ms = round((start + timedelta(milliseconds=i)).timestamp() * 1000)
        item = compose_uuid7(ms, 0, int(rng.integers(1 << 62)))
        scores = np.full(len(classes), 0.1 / max(len(classes) - 1, 1), dtype="<f4")
        scores[predicted] = 0.9
        value = rng.uniform(0, 16, size=input_shape).astype(np.float32)
        when, label = datetime.fromtimestamp(ms / 1000, UTC), classes[predicted]
        rows.append(
            Row(item, when, model_name, "v1", label, predicted, 0.9, scores.tobytes(), npy_bytes(value), "", {})
        )
        items.append(Item(item, classes[truth], classes[predicted]))
    log_store.insert_rows(conn=conn, rows=rows)
    return items


def _other(rng: np.random.Generator, classes: int, than: int) -> int:
    return int((than + 1 + rng.integers(classes - 1)) % classes)


def says(rng: np.random.Generator, reviewer: Reviewer, item: Item, classes: Sequence[str]) -> str:
    """What `reviewer` says `item` is: its true label, or with their error rate another class."""
    if rng.random() >= reviewer.error_rate:
        return item.truth
    return classes[_other(rng, len(classes), classes.index(item.truth))]


def judge(conn: psycopg.Connection, user: rs.User, item: Item, said: str) -> None:
    """`user` says `item` is `said`: 'correct' when that is the model's label, else 'wrong' with it."""
    verdict, label = (Verdict.CORRECT, None) if said == item.predicted else (Verdict.WRONG, said)
    record_outside(conn=conn, user=user, prediction_id=item.id, verdict=verdict, label=label, reason="simulated")


def users(conn: psycopg.Connection, reviewers: Sequence[Reviewer]) -> dict[str, rs.User]:
    return {r.name: rs.create_user(conn=conn, name=r.name, role=rs.Role.REVIEWER)[0] for r in reviewers}


def judge_all(
    conn: psycopg.Connection,
    items: Sequence[Item],
    reviewers: Sequence[Reviewer],
    *,
    per_item: int,
    classes: Sequence[str],
    rng: np.random.Generator,
) -> list[tuple[uuid.UUID, str, str]]:
    """Each item judged by `per_item` reviewers drawn at random; the (item, reviewer, said) triples."""
    accounts = users(conn, reviewers)
    said = []
    for item in items:
        for k in rng.choice(len(reviewers), per_item, replace=False):
            reviewer = reviewers[int(k)]
            label = says(rng, reviewer, item, classes)
            judge(conn, accounts[reviewer.name], item, label)
            said.append((item.id, reviewer.name, label))
    return said
