"""Labels weighted by reviewer reliability: on simulated reviewers (three careful, one careless),
the weights read from the annotation log equal crowd-kit's Dawid-Skene run on the same opinions,
and a training version compiled with weighting takes the disputes they settle, with the careful
reviewers' labels, and leaves the rest to an admin, recording all of it in its manifest."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
from crowdkit.aggregation import DawidSkene

from experiments.reviewers import Reviewer, judge, judge_all, log_items, users
from feedback import review as rs
from feedback.datasets import LabelSchema, read_version
from feedback.review.moderation import DISCARDED, Status, Verdict
from feedback.review.verdicts import record_outside
from feedback.review.weighting import Weighting, dawid_skene, judged, settle
from feedback.use_cases import compile_with_validation

pytestmark = pytest.mark.data

MODEL = "sim-model"
CLASSES = ("ant", "bee", "cat", "dog", "eel")
SCHEMA = LabelSchema(class_names=CLASSES, input_shape=(4,))
CAREFUL = [Reviewer(f"careful-{i}", 0.02) for i in range(3)]
CARELESS = Reviewer("careless", 0.30)


def user(conn: psycopg.Connection, name: str) -> rs.User:
    found = rs.get_user(conn=conn, name=name)
    assert found is not None
    return found


@pytest.fixture
def simulated(conn: psycopg.Connection) -> tuple[list, list]:  # type: ignore[type-arg]
    rng = np.random.default_rng(5)
    items = log_items(conn, model_name=MODEL, classes=CLASSES, n=400, model_accuracy=0.7, rng=rng)
    said = judge_all(conn, items, [*CAREFUL, CARELESS], per_item=2, classes=CLASSES, rng=rng)
    return items, said


def test_the_weights_read_from_the_log_equal_crowd_kits_dawid_skene(
    conn: psycopg.Connection,
    simulated: tuple[list, list],  # type: ignore[type-arg]
) -> None:
    items, said = simulated
    # One careless verdict taken back and given again: only the latest opinion counts.
    careless = user(conn, CARELESS.name)
    first = next(item_id for item_id, who, _ in said if who == CARELESS.name)
    record_outside(conn=conn, user=careless, prediction_id=first, verdict=Verdict.UNDO, label=None, reason="t")
    item = next(i for i in items if i.id == first)
    judge(conn, careless, item, item.truth)
    latest = {(str(i), w): s for i, w, s in said}
    latest[(str(first), CARELESS.name)] = item.truth

    found = judged(conn=conn, model_name=MODEL, watermark=None)
    assert len(found) == len(items)  # every item had two reviewers
    ours = dawid_skene(found)

    names = {user(conn, r.name).id: r.name for r in [*CAREFUL, CARELESS]}
    table = pd.DataFrame(
        sorted((t, next(k for k, v in names.items() if v == w), s) for (t, w), s in latest.items()),
        columns=["task", "worker", "label"],
    )
    model = DawidSkene(n_iter=100)
    probas = model.fit_predict_proba(table)
    for task, row in probas.iterrows():
        label, chance = ours.labels[uuid.UUID(str(task))]
        assert label == row.idxmax() and chance == pytest.approx(row.max(), abs=1e-9)
    reliability = {names[w]: r for w, r in ours.reliability.items()}
    assert reliability[CARELESS.name] < 0.8 and min(reliability[r.name] for r in CAREFUL) > 0.9
    truth = {i.id: i.truth for i in items}
    right = sum(label == truth[i] for i, (label, _) in ours.labels.items())
    assert right / len(items) > 0.95  # two careful reviewers, or one careful and the careless one


def test_a_version_compiled_with_weighting_takes_the_disputes_it_settles(
    conn: psycopg.Connection,
    simulated: tuple[list, list],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    items, _ = simulated
    truth = {str(i.id): i.truth for i in items}

    def compile_(weighting: Weighting) -> tuple[dict[str, str], dict]:  # type: ignore[type-arg]
        version = compile_with_validation(
            conn=conn, model_name=MODEL, schema=SCHEMA, originals=lambda: None, include_original=False,
            root_url=str(tmp_path), weighting=weighting,
        )  # fmt: skip
        rows = read_version(version.uri)
        return {i: CLASSES[int(k)] for i, k in zip(rows.item_ids, rows.labels, strict=True)}, version.manifest

    plain, manifest = compile_(Weighting(enabled=False))
    assert manifest["aggregation"]["method"] == "agreement"
    weighted, manifest = compile_(Weighting(enabled=True, min_confidence=0.95))
    settlement = settle(conn=conn, model_name=MODEL, watermark=manifest["watermark"], min_confidence=0.95)
    disputed = [i for i in judged(conn=conn, model_name=MODEL, watermark=manifest["watermark"])
                if i.status is Status.DISPUTED]  # fmt: skip
    assert len(disputed) > 20  # the careless reviewer disagrees with the others often
    aggregation = manifest["aggregation"]
    assert aggregation["method"] == "dawid-skene" and aggregation["library"].startswith("crowd-kit ")
    assert aggregation["settled_disputes"] == len(settlement.labels) > 0
    assert aggregation["settled_disputes"] + aggregation["unsettled_disputes"] + aggregation["discarded_disputes"] == (
        len(disputed)
    )
    # The unweighted version plus exactly the settled disputes, with their weighted labels.
    added = {i: label for i, label in weighted.items() if i not in plain}
    assert {i: weighted[i] for i in plain} == plain
    assert added == {str(i): label for i, label in settlement.labels.items()}
    assert DISCARDED not in added.values()
    assert sum(label == truth[i] for i, label in added.items()) / len(added) >= 0.9
    unsettled = {str(i.id) for i in disputed} - set(added)
    assert not unsettled & set(weighted)  # still for an admin
    # The same watermark gives the same version.
    again, _ = compile_(Weighting(enabled=True, min_confidence=0.95))
    assert again == weighted


def test_admins_resolutions_anchor_the_weights_and_users_are_separate(conn: psycopg.Connection) -> None:
    rng = np.random.default_rng(1)
    items = log_items(conn, model_name=MODEL, classes=CLASSES, n=30, model_accuracy=0.5, rng=rng)
    accounts = users(conn, [Reviewer("a", 0), Reviewer("b", 0)])
    admin, _ = rs.create_user(conn=conn, name="boss", role=rs.Role.ADMIN)
    for item in items:
        judge(conn, accounts["a"], item, item.truth)
        judge(conn, accounts["b"], item, CLASSES[(CLASSES.index(item.truth) + 1) % len(CLASSES)])
    # a and b always disagree: by themselves the weights cannot tell who is right; an admin's
    # resolutions of a few disputes say it is a.
    for item in items[:5]:
        rs.resolve(conn=conn, user=admin, prediction_id=item.id, label=item.truth, reason="checked")
    found = judged(conn=conn, model_name=MODEL, watermark=None)
    assert sum(i.resolved is not None for i in found) == 5
    weighted = dawid_skene(found)
    assert all(weighted.labels[i.id][0] == i.truth for i in items)
    by_name = {u.name: u.id for u in accounts.values()}
    assert weighted.reliability[by_name["a"]] > 0.9 and weighted.reliability[by_name["b"]] < 0.1
