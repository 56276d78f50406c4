"""A shadow's evidence from the rows the service and the reviewers write: what it predicted, what
was answered, and the labels reviewers settled on."""

from __future__ import annotations

import struct
from datetime import timedelta

import numpy as np
import psycopg
import pytest

from feedback import shadow
from feedback.ids import uuid7
from feedback.predictions import store
from feedback.predictions.records import Row, ShadowRow, created_at
from models.pipeline import BuildResult

pytestmark = pytest.mark.data


def scores(label: int) -> bytes:
    probabilities = np.full(10, 0.02, np.float32)
    probabilities[label] = 0.82
    return struct.pack("<10f", *probabilities)


def test_the_evidence_counts_agreement_judged_items_and_the_discordant_pairs(
    conn: psycopg.Connection, trained_model: BuildResult
) -> None:
    name, version = trained_model.stored.name, trained_model.stored.version
    running = shadow.start(conn=conn, model_name=name, model_version=version, share=1.0, actor=None)
    # (answered, shadow's, settled by reviewers or None): 12 items, 9 judged.
    items = [(1, 1, 1), (2, 2, 2), (3, 3, None), (4, 5, 4), (4, 5, 4), (6, 7, 7), (6, 7, 7), (6, 7, 7),
             (8, 9, 0), (0, 0, None), (5, 5, 3), (2, 3, None)]  # fmt: skip
    rows: list[Row | ShadowRow] = []
    ids = []
    for answered, proposed, _ in items:
        prediction_id = uuid7()
        ids.append(prediction_id)
        when = created_at(prediction_id)
        rows.append(Row(prediction_id, when, name, "v-answered", str(answered), answered, 0.82, scores(answered),
                        b"", "req", {}, "image/png"))  # fmt: skip
        rows.append(
            ShadowRow(prediction_id, when, name, version, str(proposed), proposed, 0.82, scores(proposed), "req")
        )
    # A shadow prediction from before the shadow started does not count.
    early = uuid7()
    old = running.started_at - timedelta(hours=1)
    rows.append(ShadowRow(early, old, name, version, "1", 1, 0.82, scores(1), "old"))
    assert store.insert_rows(conn=conn, rows=rows) == 2 * len(items) + 1
    for prediction_id, (_, _, truth) in zip(ids, items, strict=True):
        if truth is not None:
            conn.execute(
                "INSERT INTO review_state (prediction_id, item_created_at, status, label, reviewers)"
                " VALUES (%s, %s, 'reviewed', %s, 1)",
                (prediction_id, created_at(prediction_id), str(truth)),
            )

    found = shadow.evidence(conn=conn, shadow=running)
    assert (found.shadowed, found.agreed, found.judged) == (12, 5, 9)
    # Judged: champion right on 1, 2, 4, 4 (4 of 9); shadow right on 1, 2, 7, 7, 7 (5 of 9).
    assert (found.champion.correct, found.shadow.correct) == (4, 5)
    assert (found.only_champion_right, found.only_shadow_right) == (2, 3)
    assert found.p_value == pytest.approx(1.0)  # 2 against 3: no evidence either way
    assert found.champion.low < 4 / 9 < found.champion.high and found.agreement == pytest.approx(5 / 12)
