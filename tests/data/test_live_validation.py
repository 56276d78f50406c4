"""A validation set from today's domain: the health job draws a uniform random share of the digits
model's predictions, reviewers get them first with the `validation` order, a training version
compiled meanwhile holds none of them, and once judged they are frozen as a live validation version
(never overlapping a training version) whose accuracy the health report and a promotion's record
show beside the original validation version's."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg

from feedback import health
from feedback import review as rs
from feedback.champion import Decision, record_promotion
from feedback.champion import champion as current_champion
from feedback.datasets import LabelSchema, compile_training
from feedback.datasets.live import current_live, freeze_live_validation
from feedback.datasets.originals import originals_for
from feedback.datasets.store import current_validation, live_drawn_ids
from feedback.datasets.versions import item_ids
from feedback.retrain import live_figures
from feedback.review.moderation import Verdict
from feedback.review.verdicts import record_outside
from models.pipeline import BuildResult
from tests.data.test_health import HeldOut, held_out, send, undrifted  # noqa: F401 (a fixture)

SHARE = 0.05
SENT = 4000


def test_a_live_sample_is_drawn_judged_first_kept_out_of_training_and_frozen_beside_the_original(
    conn: psycopg.Connection,
    trained_model: BuildResult,
    held_out: HeldOut,  # noqa: F811
    split_path: Path,
    tmp_path: Path,
) -> None:
    stored = trained_model.stored
    name, classes = stored.name, stored.card.signature.class_names
    rng = np.random.default_rng(9)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hours = {}
    for h in range(1, 5):  # validation digits, each a hair apart (an input equal to a validation one never trains)
        x, y = undrifted(rng, held_out, SENT // 4)
        hours[now - timedelta(hours=h)] = (np.clip(x + rng.uniform(0, 1e-3, x.shape), 0, 16).astype(np.float32), y)
    traffic = send(conn, trained_model, hours)
    health.advance_all(conn, config=health.HealthConfig(lookback_s=6 * 3600, delay_s=0, live_share=SHARE))
    drawn = live_drawn_ids(conn=conn, model_name=name)
    assert abs(len(drawn) - SENT * SHARE) <= 4 * (SENT * SHARE * (1 - SHARE)) ** 0.5  # a binomial draw
    truth = {str(i): int(t) for h in hours for i, t in zip(traffic.ids[h], traffic.truth[h], strict=True)}
    answered = {str(i): int(a) for h in hours for i, a in zip(traffic.ids[h], traffic.answered[h], strict=True)}

    # Reviewers: the validation order leases the drawn items only; judge them, and 100 others.
    user, _ = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
    claimed = rs.claim(conn=conn, user=user, count=500, strategy=rs.Strategy.VALIDATION, lease_seconds=600)
    assert {str(c.prediction_id) for c in claimed} == drawn
    others = [i for i in truth if i not in drawn][:100]
    for item in [*drawn, *others]:
        right = truth[item] == answered[item]
        verdict, label = (Verdict.CORRECT, None) if right else (Verdict.WRONG, classes[truth[item]])
        record_outside(conn=conn, user=user, prediction_id=uuid.UUID(item), verdict=verdict, label=label, reason="test")

    schema = LabelSchema.of(stored.card.model_spec)
    validation = current_validation(conn=conn, model_name=name)
    assert validation is not None
    originals = originals_for(conn, name, split_path)
    training = compile_training(conn=conn, model_name=name, schema=schema, originals=originals, validation=validation,
                                root_url=str(tmp_path / "ds"))  # fmt: skip
    trained_ids = set(item_ids(training.uri))
    assert set(others) <= trained_ids and not trained_ids & drawn

    frozen = freeze_live_validation(
        conn=conn, model_name=name, schema=schema, root_url=str(tmp_path / "ds"), min_judged=50
    )
    assert frozen is not None and current_live(conn=conn, model_name=name) == frozen
    live_ids = set(item_ids(frozen.uri))
    assert live_ids == drawn and not live_ids & trained_ids
    assert (
        freeze_live_validation(conn=conn, model_name=name, schema=schema, root_url=str(tmp_path / "ds"), min_judged=50)
        is None
    )
    by_hand = sum(answered[i] == truth[i] for i in drawn) / len(drawn)

    report = health.report(conn, model_name=name, class_names=classes, since=now - timedelta(hours=5), until=now)
    figures = report.references[stored.version]
    assert figures["live_validation_id"] == frozen.id and figures["live_samples"] == len(drawn)
    assert figures["live_accuracy"] == by_hand
    assert figures["validation_id"] == validation.id and 0.9 < figures["accuracy"] <= 1  # the original's, beside

    # A promotion records both, the gate's on the original version and these on the live one.
    on_live = live_figures(conn, name, stored.version, None)
    assert on_live == {"id": frozen.id, "samples": len(drawn), "accuracy": by_hand}
    record_promotion(conn=conn, model_name=name, model_version=stored.version, decision=Decision.FORCED, reason="test",
                     validation_id=validation.id, live_validation=on_live)  # fmt: skip
    recorded = current_champion(conn=conn, model_name=name)
    assert recorded is not None and recorded.live_validation == on_live
