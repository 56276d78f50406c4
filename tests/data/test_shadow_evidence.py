"""A shadow's evidence from the rows the service and the reviewers write: what it predicted, what
was answered, and the labels reviewers settled on."""

from __future__ import annotations

import struct
from datetime import timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest

from feedback import shadow
from feedback.champion import Decision, champion, record_promotion
from feedback.datasets import LabelSchema, bundled_originals, freeze_validation
from feedback.errors import NotFound
from feedback.ids import uuid7
from feedback.predictions import store
from feedback.predictions.records import Row, ShadowRow, created_at
from feedback.use_cases import decide_shadow
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
    answer_ms, shadow_ms = np.arange(1, 13, dtype=np.float32) * 1.5, np.arange(12, dtype=np.float32) ** 2
    for (answered, proposed, _), a_ms, s_ms in zip(items, answer_ms, shadow_ms, strict=True):
        prediction_id = uuid7()
        ids.append(prediction_id)
        when = created_at(prediction_id)
        rows.append(Row(prediction_id, when, name, "v-answered", str(answered), answered, 0.82, scores(answered),
                        b"", "req", {}, "image/png"))  # fmt: skip
        rows.append(ShadowRow(prediction_id, when, name, version, str(proposed), proposed, 0.82, scores(proposed),
                              "req", float(a_ms), float(s_ms)))  # fmt: skip
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
    # Call times per sample, as numpy's linear percentiles (the row from before the start has none).
    for latency, times in ((found.answer_latency, answer_ms), (found.shadow_latency, shadow_ms)):
        assert [latency.p50_ms, latency.p95_ms] == pytest.approx(np.percentile(times, [50, 95]).tolist())
    # Over time: cumulative, ending on the totals (all items predicted within the first stretches).
    moments = shadow.timeline(conn=conn, shadow=running)
    assert moments and (moments[-1].judged, moments[-1].champion_correct, moments[-1].shadow_correct) == (9, 4, 5)
    assert [m.judged for m in moments] == sorted(m.judged for m in moments)
    assert all(m.until > running.started_at for m in moments)


def test_judge_applies_the_policy_to_both_pieces_of_evidence() -> None:
    def found(judged: int, only_champion: int, only_shadow: int) -> shadow.Evidence:
        acc = shadow.wilson(0, judged)
        return shadow.Evidence("m", "v2", judged, 0, judged, acc, acc, only_champion, only_shadow,
                               shadow.mcnemar_exact(only_champion, only_shadow))  # fmt: skip

    not_worse, better = shadow.Rules(min_judged=20), shadow.Rules(policy=shadow.Policy.BETTER, min_judged=20)
    cases = [
        (found(10, 0, 9), True, not_worse, False, "fewer than the 20"),
        (found(40, 3, 4), True, not_worse, True, "not worse"),
        (found(40, 3, 4), False, not_worse, False, "frozen-set gate"),
        (found(40, 12, 1), True, not_worse, False, "worse on live items"),
        (found(40, 1, 12), False, better, True, "better on live items"),
        (found(40, 3, 4), True, better, False, "not better"),
    ]
    for evidence, frozen_passed, rules, promote, words in cases:
        verdict = shadow.judge(evidence, frozen_passed=frozen_passed, rules=rules)
        assert verdict.promote is promote and words in verdict.reason, (evidence, rules, verdict)


@pytest.fixture
def shadowed(conn: psycopg.Connection, trained_model: BuildResult, split_path: Path, tmp_path: Path) -> shadow.Shadow:
    """The trained model shadowing itself, a validation version frozen, the shadow right and the
    answers wrong on ten judged live items."""
    name, version = trained_model.stored.name, trained_model.stored.version
    originals = bundled_originals(name, split_path)
    assert originals is not None
    schema = LabelSchema.of(trained_model.stored.card.model_spec)
    freeze_validation(conn=conn, model_name=name, originals=originals, schema=schema, root_url=str(tmp_path / "ds"))
    # The champion is that same version (whatever else the session's store holds of the model).
    record_promotion(conn=conn, model_name=name, model_version=version, decision=Decision.BASELINE, reason="test")
    running = shadow.start(conn=conn, model_name=name, model_version=version, share=1.0, actor=None)
    rows: list[Row | ShadowRow] = []
    for _ in range(10):
        prediction_id = uuid7()
        when = created_at(prediction_id)
        rows += [Row(prediction_id, when, name, version, "1", 1, 0.82, scores(1), b"", "r", {}, "image/png"),
                 ShadowRow(prediction_id, when, name, version, "2", 2, 0.82, scores(2), "r")]  # fmt: skip
        conn.execute(
            "INSERT INTO review_state (prediction_id, item_created_at, status, label, reviewers)"
            " VALUES (%s, %s, 'reviewed', '2', 1)",
            (prediction_id, when),
        )
    store.insert_rows(conn=conn, rows=rows)
    return running


def test_a_shadow_better_on_live_items_is_promoted_with_its_figures(
    conn: psycopg.Connection, shadowed: shadow.Shadow
) -> None:
    champions: list[tuple[str, str]] = []
    shadows: list[tuple[str, shadow.Shadow | None]] = []
    decided = decide_shadow(conn=conn, model_name=shadowed.model_name,
                            rules=shadow.Rules(policy=shadow.Policy.BETTER, min_judged=10), actor=None,
                            announcer=lambda n, v: champions.append((n, v)),
                            shadow_announcer=lambda n, s: shadows.append((n, s)))  # fmt: skip
    promotion = decided.promotion
    assert promotion.decision is Decision.PROMOTED and "better on live items at p < 0.05" in promotion.reason
    assert promotion.live_evidence is not None and promotion.live_evidence["only_shadow_right"] == 10
    assert promotion.live_evidence["p_value"] == pytest.approx(2 / 1024)
    assert champions == [(shadowed.model_name, shadowed.model_version)]
    assert shadows == [(shadowed.model_name, None)]
    assert shadow.current(conn=conn, model_name=shadowed.model_name) is None  # a new champion ends it
    assert champion(conn=conn, model_name=shadowed.model_name) == promotion


def test_a_shadow_that_fails_the_frozen_set_gate_is_rejected_and_stopped(
    conn: psycopg.Connection, shadowed: shadow.Shadow
) -> None:
    decided = decide_shadow(conn=conn, model_name=shadowed.model_name, rules=shadow.Rules(min_judged=10),
                            actor=None, announcer=None, shadow_announcer=None)  # fmt: skip
    # The model against itself: its validation accuracy does not beat its own by more than the margin.
    assert decided.promotion.decision is Decision.REJECTED
    assert "does not pass the frozen-set gate" in decided.promotion.reason
    stopped = shadow.history(conn=conn, model_name=shadowed.model_name)[-1]
    assert not stopped.live and stopped.stop_reason is not None and stopped.stop_reason.startswith("rejected:")
    with pytest.raises(NotFound, match="no shadow"):
        decide_shadow(conn=conn, model_name=shadowed.model_name, rules=shadow.Rules(), actor=None, announcer=None,
                      shadow_announcer=None)  # fmt: skip
