"""Live model health on the real log: the digits model's predictions, with known true labels, written
into Postgres over 60 past hours, folded by the health job and read as windows. Undrifted traffic
raises alarms at no more than the tests' level and its estimated accuracy is within 3 points of the
truth; shifted inputs, noised inputs and a class whose share jumps are each flagged, and the
estimate falls with the true accuracy under noise; every prediction is counted once; reviewers'
verdicts give the judged accuracy, and a disagreement is flagged."""

from __future__ import annotations

import io
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from numpy.typing import NDArray
from PIL import Image

from feedback import health
from feedback import review as rs
from feedback.datasets import LabelSchema
from feedback.datasets.originals import originals_for
from feedback.datasets.validation import freeze_validation
from feedback.errors import Invalid
from feedback.ids import compose_uuid7
from feedback.predictions import store as log_store
from feedback.predictions.records import Row
from feedback.review.moderation import Verdict
from feedback.review.verdicts import record_outside
from models.npy import npy_bytes
from models.pipeline import BuildResult
from models.runtime import DevicePreference, OnnxModel
from models.signature import to_probabilities
from tests.graphs import SHAPES, import_shapes_model

HOURS = 60  # undrifted windows
PER_HOUR = 150
ALPHA = 0.01
NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
START = NOW - timedelta(hours=HOURS + 3)


@dataclass
class Traffic:
    """What was sent in each hour, with the true labels and the model's answers."""

    truth: dict[datetime, NDArray[np.int64]]
    answered: dict[datetime, NDArray[np.int64]]
    ids: dict[datetime, list[uuid.UUID]]

    def accuracy(self, hours: list[datetime]) -> float:
        return float(np.mean(np.concatenate([self.answered[h] == self.truth[h] for h in hours])))


@dataclass(frozen=True)
class HeldOut:
    """The validation digits the reference is made of: undrifted traffic is drawn from them (with
    replacement), i.e. from the very distribution the reference stands for. Digits has no third
    split: the model's training digits are answered more confidently than new ones (a drift in
    confidence), and half the validation split against the other half differ by more than a
    window's sampling (180 digits each)."""

    images: NDArray[np.float32]
    labels: NDArray[np.int64]


@pytest.fixture
def held_out(conn: psycopg.Connection, trained_model: BuildResult, split_path: Path, tmp_path: Path) -> HeldOut:
    """The model's validation version, frozen from its validation split; its digits, to draw traffic from."""
    stored = trained_model.stored
    originals = originals_for(conn, stored.name, split_path)
    assert originals is not None and originals.validation is not None
    schema = LabelSchema.of(stored.card.model_spec)
    freeze_validation(conn=conn, model_name=stored.name, originals=originals, schema=schema, root_url=str(tmp_path))
    rows, classes = originals.validation, stored.card.signature.class_names
    images = np.stack([np.asarray(x, dtype=np.float32) for x in rows.inputs])
    return HeldOut(images, np.array([classes.index(label) for label in rows.labels], dtype=np.int64))


def send(
    conn: psycopg.Connection, trained: BuildResult, hours: dict[datetime, tuple[NDArray[np.float32], NDArray[np.int64]]]
) -> Traffic:
    stored = trained.stored
    session = OnnxModel(stored.onnx_path, device=DevicePreference.CPU)
    classes = stored.card.signature.class_names
    traffic = Traffic({}, {}, {})
    rows, rng = [], np.random.default_rng(0)
    for hour, (x, truth) in hours.items():
        probabilities = to_probabilities(session.run(x), stored.card.model_spec.output_kind)
        answered = probabilities.argmax(axis=1)
        traffic.truth[hour], traffic.answered[hour], traffic.ids[hour] = truth, answered, []
        for i, sample in enumerate(x):
            ms = round((hour + timedelta(seconds=i * 3600 / len(x))).timestamp() * 1000)
            item = compose_uuid7(ms, 0, int(rng.integers(1 << 62)))  # created_at is the id's time
            when = datetime.fromtimestamp(ms / 1000, UTC)
            traffic.ids[hour].append(item)
            label = int(answered[i])
            rows.append(Row(item, when, stored.name, stored.version, classes[label], label,
                            float(probabilities[i].max()), probabilities[i].astype("<f4").tobytes(),
                            npy_bytes(sample), f"r-{item}", {}))  # fmt: skip
    log_store.insert_rows(conn=conn, rows=rows)
    return traffic


def undrifted(rng: np.random.Generator, held_out: HeldOut, n: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    picked = rng.choice(len(held_out.labels), n)
    return held_out.images[picked], held_out.labels[picked]


def test_health_windows_flag_drift_estimate_accuracy_and_count_every_prediction_once(
    conn: psycopg.Connection, trained_model: BuildResult, held_out: HeldOut
) -> None:
    rng = np.random.default_rng(7)
    hours = {START + timedelta(hours=h): undrifted(rng, held_out, PER_HOUR) for h in range(HOURS)}
    x, y = undrifted(rng, held_out, PER_HOUR)
    shifted_hour, noised_hour, jumped_hour = (START + timedelta(hours=HOURS + k) for k in range(3))
    hours[shifted_hour] = (np.clip(x + 2, 0, 16), y)
    hours[noised_hour] = (np.clip(x + rng.normal(0, 4, x.shape), 0, 16).astype(np.float32), y)
    threes = np.flatnonzero(held_out.labels == 3)
    jumped = np.concatenate([rng.choice(threes, PER_HOUR // 2), rng.choice(len(held_out.labels), PER_HOUR // 2)])
    hours[jumped_hour] = (held_out.images[jumped], held_out.labels[jumped])
    traffic = send(conn, trained_model, hours)

    name = trained_model.stored.name
    config = health.HealthConfig(lookback_s=(HOURS + 4) * 3600, delay_s=0)
    assert health.advance_all(conn, config=config) == len(hours) * PER_HOUR
    assert health.advance_all(conn, config=config) == 0  # caught up: nothing folded twice
    classes = trained_model.stored.card.signature.class_names
    report = health.report(conn, model_name=name, class_names=classes, since=START, until=NOW, alpha=ALPHA)
    windows = {w.start: w for w in report.windows}
    assert sum(w.count for w in report.windows) == len(hours) * PER_HOUR
    assert list(report.references) == [trained_model.stored.version]

    quiet = [windows[h] for h in sorted(hours)[:HOURS]]
    allowed = math.ceil(ALPHA * HOURS)
    for kind in ("labels", "confidence", "inputs"):
        raised = sum(kind in w.alarms for w in quiet)
        assert raised <= allowed, f"{kind}: {raised} alarms over {HOURS} undrifted windows (level {ALPHA})"
    assert all(len(w.shifts) == 3 for w in quiet)
    assert windows[shifted_hour].alarms and "inputs" in windows[shifted_hour].alarms
    assert "inputs" in windows[noised_hour].alarms
    assert "labels" in windows[jumped_hour].alarms
    assert windows[jumped_hour].labels["3"] >= PER_HOUR // 2 - 5

    # Estimated accuracy: within 3 points of the truth on undrifted traffic, a day at a time.
    daily = health.report(conn, model_name=name, class_names=classes, since=START, until=START + timedelta(hours=HOURS),
                          window_s=24 * 3600, alpha=ALPHA)  # fmt: skip
    for window in daily.windows:
        day = [h for h in hours if window.start <= h < window.end and h < shifted_hour]
        assert window.estimated is not None
        assert abs(window.estimated.value - traffic.accuracy(day)) <= 0.03, (window.start, window.estimated)
    # ... and moving with it under noise.
    calm = windows[sorted(hours)[0]]
    assert traffic.accuracy([noised_hour]) < traffic.accuracy(sorted(hours)[:HOURS])
    assert windows[noised_hour].estimated.value < calm.estimated.value  # type: ignore[union-attr]


def test_judged_accuracy_comes_from_verdicts_and_a_disagreement_is_flagged(
    conn: psycopg.Connection, trained_model: BuildResult, held_out: HeldOut
) -> None:
    rng = np.random.default_rng(3)
    hour = NOW - timedelta(hours=2)
    traffic = send(conn, trained_model, {hour: undrifted(rng, held_out, 200)})
    user, _ = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
    classes = trained_model.stored.card.signature.class_names
    judged = traffic.ids[hour][:40]  # reviewers say 30 of them are wrong: far below what the model promises
    for i, item in enumerate(judged):
        answered = int(traffic.answered[hour][i])
        if i < 30:
            record_outside(conn=conn, user=user, prediction_id=item, verdict=Verdict.WRONG,
                           label=classes[(answered + 1) % 10], reason="test")  # fmt: skip
        else:
            record_outside(conn=conn, user=user, prediction_id=item, verdict=Verdict.CORRECT, label=None, reason="test")
    health.advance_all(conn, config=health.HealthConfig(lookback_s=4 * 3600, delay_s=0))
    report = health.report(conn, model_name=trained_model.stored.name, class_names=classes,
                           since=hour, until=NOW, alpha=ALPHA)  # fmt: skip
    (window,) = report.windows
    assert window.count == 200 and window.judged_count == 40
    assert window.judged is not None and window.judged.value == pytest.approx(10 / 40)
    assert window.judged.low < 0.25 < window.judged.high
    assert window.estimated is not None and window.estimated.value > 0.9
    assert window.disagree


def test_the_drift_order_spends_reviewers_on_the_class_whose_share_rose(
    conn: psycopg.Connection, trained_model: BuildResult, held_out: HeldOut
) -> None:
    rng = np.random.default_rng(5)
    threes = np.flatnonzero(held_out.labels == 3)
    jumped = np.concatenate([rng.choice(threes, 100), rng.choice(len(held_out.labels), 100)])
    calm, drifted = NOW - timedelta(hours=3), NOW - timedelta(hours=2)
    traffic = send(
        conn,
        trained_model,
        {calm: undrifted(rng, held_out, 200), drifted: (held_out.images[jumped], held_out.labels[jumped])},
    )
    health.advance_all(conn, config=health.HealthConfig(lookback_s=5 * 3600, delay_s=0))
    name = trained_model.stored.name
    segments = health.drifted_segments(conn)
    assert segments[0] == f"{name}/3"
    user, _ = rs.create_user(conn=conn, name="rev", role=rs.Role.REVIEWER)
    claimed = rs.claim(conn=conn, user=user, count=60, strategy=rs.Strategy.DRIFT, lease_seconds=60, drifted=segments)
    answered_three = sum(int(a == 3) for a in traffic.answered[calm]) + sum(
        int(a == 3) for a in traffic.answered[drifted]
    )
    assert len(claimed) == 60 and answered_three >= 60
    assert {c.label for c in claimed} == {"3"}  # the drifted segment first
    assert [c.created_at for c in claimed] == sorted((c.created_at for c in claimed), reverse=True)
    others = rs.claim(conn=conn, user=user, count=20, strategy=rs.Strategy.OLDEST, lease_seconds=60)
    assert {c.label for c in others} != {"3"}  # where the oldest order would have sent them


def test_a_window_the_team_picks_becomes_the_reference(
    conn: psycopg.Connection, trained_model: BuildResult, held_out: HeldOut
) -> None:
    """Noised inputs from the start: against the validation version every hour alarms on inputs;
    against the first noised hour, picked as the reference, the next ones do not, and the estimate
    keeps the validation version's calibration; back on the validation version, they alarm again."""
    rng = np.random.default_rng(13)
    first, second, third, fourth = (NOW - timedelta(hours=h) for h in (4, 3, 2, 1))

    def noised() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        x, y = undrifted(rng, held_out, 300)
        return np.clip(x + rng.normal(0, 3, x.shape), 0, 16).astype(np.float32), y

    send(conn, trained_model, {hour: noised() for hour in (first, second, third, fourth)})
    name, classes = trained_model.stored.name, trained_model.stored.card.signature.class_names
    version = trained_model.stored.version

    def fold_until(when: datetime) -> dict[datetime, health.Window]:
        config = health.HealthConfig(lookback_s=(when - first).total_seconds() + 3600, delay_s=0)
        for _ in range(8):  # an hour a pass at most
            health.advance(conn, model_name=name, config=config, now=when)
        found = health.report(conn, model_name=name, class_names=classes, since=first, until=NOW + timedelta(hours=1))
        return {w.start: w for w in found.windows}

    before = fold_until(third)
    assert set(before) == {first, second} and all("inputs" in w.alarms for w in before.values())
    with pytest.raises(Invalid, match="made no predictions"):
        health.choose_reference(conn, model_name=name, since=NOW, until=NOW + timedelta(hours=1))
    assert health.choose_reference(conn, model_name=name, since=first, until=second) == [version]
    picked = fold_until(fourth)
    assert "inputs" not in picked[third].alarms  # like the hour it is compared with
    assert "inputs" in picked[second].alarms  # folded before: against the validation version still
    estimated, calibrated = picked[third].estimated, picked[second].estimated
    assert estimated is not None and calibrated is not None and abs(estimated.value - calibrated.value) < 0.05

    assert health.choose_reference(conn, model_name=name, since=None, until=None) == []
    again = fold_until(NOW + timedelta(minutes=1))
    assert "inputs" in again[fourth].alarms  # the validation version again


def test_an_image_models_inputs_are_watched_by_size_brightness_and_contrast(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    """A team's image model without a validation version: its first hour of (dark) images picked as
    the reference, an hour of the same kind raises no input alarm, an hour of bright ones does."""
    stored = import_shapes_model(tmp_path, f"shapes-health-{uuid.uuid4().hex[:8]}")
    rng = np.random.default_rng(17)
    first, second, third = (NOW - timedelta(hours=h) for h in (4, 3, 2))

    def images(hour: datetime, bright: bool) -> list[Row]:
        rows = []
        for i in range(120):
            ms = round((hour + timedelta(seconds=i * 30)).timestamp() * 1000)
            item = compose_uuid7(ms, 0, int(rng.integers(1 << 62)))
            low, high = (150, 256) if bright else (0, 100)
            pixels = rng.integers(low, high, size=(20, 24, 3), dtype=np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(out, format="PNG")
            label = int(rng.integers(3))
            when, scores = datetime.fromtimestamp(ms / 1000, UTC), np.full(3, 1 / 3, dtype="<f4").tobytes()
            row = Row(
                item,
                when,
                stored.name,
                stored.version,
                SHAPES[label],
                label,
                0.8,
                scores,
                out.getvalue(),
                f"r-{item}",
                {},
            )
            rows.append(row._replace(input_type="image/png"))
        return rows

    log_store.insert_rows(conn=conn, rows=images(first, False) + images(second, False) + images(third, True))
    assert health.choose_reference(conn, model_name=stored.name, since=first, until=second) == [stored.version]
    config = health.HealthConfig(lookback_s=5 * 3600, delay_s=0, images_per_pass=80)
    health.advance_all(conn, config=config)
    report = health.report(conn, model_name=stored.name, class_names=tuple(SHAPES), since=first, until=NOW)
    windows = {w.start: w for w in report.windows}
    assert [windows[h].count for h in (first, second, third)] == [120, 120, 120]
    assert "inputs" not in windows[second].alarms and "inputs" in windows[third].alarms
    worst = next(s for s in windows[third].shifts if s.kind == "inputs")
    assert worst.worst in {"brightness R", "brightness G", "brightness B"}
    assert windows[third].estimated is not None  # confidence as it is: no validation version to calibrate by
