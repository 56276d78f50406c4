"""A model that came without data: its validation version drawn from judged items, its training
versions compiled from the rest."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from feedback import review as rs
from feedback.datasets import (
    MIN_JUDGED_PER_CLASS,
    LabelSchema,
    freeze_validation_from_verdicts,
    read_version,
)
from feedback.datasets import store as dataset_store
from feedback.use_cases import compile_with_validation
from models.npy import npy_bytes

pytestmark = pytest.mark.data

MODEL = "team-model"
SCHEMA = LabelSchema(class_names=("cat", "dog", "owl"), input_shape=(4,))


@pytest.fixture
def admin(conn: psycopg.Connection) -> rs.User:
    return rs.create_user(conn=conn, name="admin", role=rs.Role.ADMIN)[0]


def judge(conn: psycopg.Connection, user: rs.User, counts: dict[str, int]) -> dict[str, str]:
    """Judged items of MODEL (samples a reviewer added carry a current label): label by id."""
    labels: dict[str, str] = {}
    rng = np.random.default_rng(sum(counts.values()))
    for label, n in counts.items():
        for _ in range(n):
            value = rng.normal(size=4).astype(np.float32)
            state = rs.add_sample(conn=conn, user=user, model_name=MODEL, input=npy_bytes(value), label=label,
                                  reason=None)  # fmt: skip
            labels[str(state.prediction_id)] = label
    return labels


def test_too_few_judged_items_are_refused_with_fixes_that_work(
    conn: psycopg.Connection, admin: rs.User, tmp_path: Path
) -> None:
    judge(conn, admin, {"cat": 9, "dog": 2, "owl": MIN_JUDGED_PER_CLASS - 1})
    with pytest.raises(rs.Conflict) as refused:
        compile_with_validation(conn=conn, model_name=MODEL, schema=SCHEMA, originals=lambda: None,
                                include_original=True, root_url=str(tmp_path))  # fmt: skip
    message = str(refused.value)
    assert "'dog' has 2, 'owl' has 4" in message and "'cat'" not in message
    assert "judge more of its predictions" in message and f"loop datasets import {MODEL} DIR" in message
    assert dataset_store.current_validation(conn=conn, model_name=MODEL) is None  # nothing recorded


def test_validation_is_drawn_stratified_from_verdicts_and_held_out_of_training(
    conn: psycopg.Connection, admin: rs.User, tmp_path: Path
) -> None:
    labels = judge(conn, admin, {"cat": 20, "dog": 7, "owl": 5})
    training = compile_with_validation(conn=conn, model_name=MODEL, schema=SCHEMA, originals=lambda: None,
                                       include_original=True, root_url=str(tmp_path))  # fmt: skip
    validation = dataset_store.current_validation(conn=conn, model_name=MODEL)
    assert validation is not None and training.validation_id == validation.id
    # 20% of each class, at least 2: cat 4, dog 2 (round(1.4) = 1 -> 2), owl 2.
    assert validation.per_class == {"cat": 4, "dog": 2, "owl": 2}
    assert validation.manifest["source"]["verdicts"]["judged"] == 32
    held, trained = read_version(validation.uri), read_version(training.uri)
    assert not set(held.item_ids) & set(trained.item_ids)
    assert sorted([*held.item_ids, *trained.item_ids]) == sorted(labels)
    assert all(held.label_names[i] == labels[item] for i, item in enumerate(held.item_ids))
    assert training.per_class == {"cat": 16, "dog": 5, "owl": 3}

    # Frozen: more verdicts later make a bigger training version, never another validation version.
    more = judge(conn, admin, {"owl": 10})
    again = compile_with_validation(conn=conn, model_name=MODEL, schema=SCHEMA, originals=lambda: None,
                                    include_original=False, root_url=str(tmp_path))  # fmt: skip
    assert again.validation_id == validation.id and again.rows == training.rows + len(more)
    assert freeze_validation_from_verdicts(conn=conn, model_name=MODEL, schema=SCHEMA,
                                           root_url=str(tmp_path)).id == validation.id  # fmt: skip
    assert len(dataset_store.list_versions(conn=conn, model_name=MODEL, kind=dataset_store.Kind.VALIDATION)) == 1


def test_the_draw_is_the_documented_seeded_one(conn: psycopg.Connection, admin: rs.User, tmp_path: Path) -> None:
    """Per class in the schema's order: its items in id order, permuted by one generator of the seed."""
    labels = judge(conn, admin, {"cat": 12, "dog": 6, "owl": 9})
    frozen = freeze_validation_from_verdicts(conn=conn, model_name=MODEL, schema=SCHEMA, root_url=str(tmp_path),
                                             seed=3)  # fmt: skip
    rng = np.random.default_rng(3)
    expected: set[str] = set()
    for name in SCHEMA.class_names:
        items = sorted(i for i, label in labels.items() if label == name)
        expected.update(items[j] for j in rng.permutation(len(items))[: max(2, round(0.2 * len(items)))])
    held = read_version(frozen.uri).item_ids
    assert set(held) == expected and held == sorted(held)
    assert all(uuid.UUID(i).version == 7 for i in held)
