"""Retrain → evaluate → gate → promote on a planted case, with MLflow runs on a store of its own."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import torch

from feedback import champion as dataset_store
from feedback import review as rs
from feedback.champion import Decision, gate, promote, reevaluate
from feedback.datasets import (
    DatasetVersion,
    LabelFix,
    LabelSchema,
    Originals,
    bundled_originals,
    compile_training,
    fix_validation,
    freeze_validation,
)
from feedback.retrain import RetrainResult, retrain
from feedback.tracking import Tracking
from models import builtin, digits, store
from models.npy import npy_bytes
from models.train import Normalised, TrainConfig, train
from models.trainers import Trained, TrainRequest

pytestmark = pytest.mark.data

SCHEMA = LabelSchema(class_names=digits.CLASS_NAMES, input_shape=digits.INPUT_SHAPE)
SPEC = digits.digits_spec()
RARE = "3"
FAST = TrainConfig(epochs=12)


@pytest.fixture
def tracking(tmp_path: Path) -> Tracking:
    return Tracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_uri=(tmp_path / "runs").as_uri())


def add_rows(conn: psycopg.Connection, user: rs.User, originals: Originals, label: str, start: int, count: int) -> None:
    rows = [i for i, lab in enumerate(originals.train.labels) if lab == label][start : start + count]
    assert len(rows) == count
    for i in rows:
        sample = npy_bytes(originals.train.inputs[i])  # type: ignore[arg-type]
        rs.add_sample(conn=conn, user=user, model_name=name_of(conn), input=sample, label=label, reason=None)


def name_of(conn: psycopg.Connection) -> str:
    """The model of a test: one per test database."""
    return conn.info.dbname


def digits_data(split_path: Path) -> Originals:
    found = bundled_originals(builtin.DEFAULT_MODEL_NAME, split_path)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted"),
    [(0.9, None, 0.0, True), (0.9, 0.8, 0.0, True), (0.9, 0.9, 0.0, False), (0.9, 0.85, 0.05, False),
     (0.91, 0.85, 0.05, True), (0.7, 0.8, 0.0, False)],
)  # fmt: skip
def test_gate(candidate: float, champion: float | None, margin: float, promoted: bool) -> None:
    assert gate(candidate, champion, margin)[0] is promoted


def assert_logged(tracking: Tracking, result: RetrainResult, *, dataset_id: str, validation_id: str) -> None:
    """The run is in MLflow with its ids, per-epoch curves and plots, and the stored model names it."""
    client = tracking.client()
    run = client.get_run(result.run_id)
    assert run.data.params["dataset_id"] == dataset_id
    assert run.data.params["validation_id"] == validation_id
    assert run.data.tags["decision"] == result.promotion.decision.value
    assert run.data.metrics["accuracy"] == pytest.approx(result.evaluation.accuracy)
    history = client.get_metric_history(result.run_id, "validation_error")
    assert [m.step for m in history] == list(range(1, FAST.epochs + 1))
    assert history[-1].value == pytest.approx(result.build.history.epochs[-1].validation_error)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"learning_curves.png", "confusion.png", "reliability.png", "evaluation.json"} <= artifacts
    stored = store.get(result.build.stored.tag)
    assert stored.card.extra["mlflow_run_id"] == result.run_id
    assert stored.card.dataset_id == dataset_id


def test_corrected_samples_of_a_rare_class_earn_a_promotion_and_a_worse_model_is_refused(
    conn: psycopg.Connection, split_path: Path, tmp_path: Path, tracking: Tracking
) -> None:
    name = name_of(conn)
    root = str(tmp_path / "datasets")
    originals = digits_data(split_path)
    admin = rs.create_user(conn=conn, name="admin", role=rs.Role.ADMIN)[0]
    validation = freeze_validation(conn=conn, model_name=name, originals=originals, schema=SCHEMA, root_url=root)
    for label in SCHEMA.class_names:
        add_rows(conn, admin, originals, label, 0, 2 if label == RARE else 25)
    few = compile_training(
        conn=conn, model_name=name, schema=SCHEMA, originals=None, validation=validation, root_url=root
    )
    announced: list[tuple[str, str]] = []

    def announcer(model_name: str, version: str) -> None:
        announced.append((model_name, version))

    first = retrain(
        conn=conn, model_name=name, dataset=few, tracking=tracking, config=FAST, announcer=announcer, spec=SPEC
    )
    assert first.promotion.decision is Decision.PROMOTED and first.promotion.reason == "no champion yet"
    assert announced == [(name, first.build.stored.version)]

    add_rows(conn, admin, originals, RARE, 2, 25)  # reviewers correct the rare class
    more = compile_training(
        conn=conn, model_name=name, schema=SCHEMA, originals=None, validation=validation, root_url=root
    )
    assert more.per_class[RARE] == few.per_class[RARE] + 25
    second = retrain(
        conn=conn, model_name=name, dataset=more, tracking=tracking, config=FAST, announcer=announcer, spec=SPEC
    )
    assert second.evaluation.per_class[RARE].recall > first.evaluation.per_class[RARE].recall
    assert second.evaluation.accuracy >= first.evaluation.accuracy
    assert second.promotion.decision is Decision.PROMOTED, second.promotion.reason
    assert second.promotion.champion_version == first.build.stored.version
    assert announced[-1] == (name, second.build.stored.version)

    # The same protocol on the smaller set again gives the first model back: not better, refused.
    worse = retrain(
        conn=conn, model_name=name, dataset=few, tracking=tracking, config=FAST, announcer=announcer, spec=SPEC
    )
    assert worse.promotion.decision is Decision.REJECTED
    assert "does not beat" in worse.promotion.reason
    assert worse.evaluation.accuracy == pytest.approx(first.evaluation.accuracy)
    assert len(announced) == 2
    champion = dataset_store.champion(conn=conn, model_name=name)
    assert champion is not None and champion.model_version == second.build.stored.version
    assert store.exists(f"{name}:{worse.build.stored.version}")  # kept as a candidate

    assert_logged(tracking, second, dataset_id=more.id, validation_id=validation.id)

    # A validation fix: a new version, and every model compared on the old one is evaluated on it.
    assert originals.validation is not None
    item = originals.validation.ids[0]
    other = "1" if originals.validation.labels[0] != "1" else "2"
    fixed = fix_validation(
        conn=conn, model_name=name, fixes=[LabelFix(item, other, "mislabelled")], schema=SCHEMA, root_url=root,
        actor=admin,
    )  # fmt: skip
    again = reevaluate(conn, old=validation, new=fixed)
    versions = {r.build.stored.version for r in (first, second, worse)}
    assert {v for _, v, _ in again} == versions
    assert {v: acc for v, acc in ((v, a) for _, v, a in again)} == {
        v: dataset_store.get_evaluation(conn=conn, model_name=name, model_version=v, validation_id=fixed.id)
        for _, v, _ in again
    }

    # Forcing the refused candidate is an admin's recorded action.
    with pytest.raises(rs.Invalid, match="needs a reason"):
        promote(conn=conn, model_name=name, model_version=worse.build.stored.version, reason=" ", actor=admin)
    forced = promote(
        conn=conn, model_name=name, model_version=worse.build.stored.version, reason="rollback drill", actor=admin,
        announcer=announcer,
    )  # fmt: skip
    assert (forced.decision, forced.actor) == (Decision.FORCED, "admin")
    assert announced[-1] == (name, worse.build.stored.version)
    decisions = [p.decision for p in dataset_store.promotions(conn=conn, model_name=name)]
    assert decisions == [Decision.PROMOTED, Decision.PROMOTED, Decision.REJECTED, Decision.FORCED]


TRAINED: list[TrainRequest] = []


def compiled(conn: psycopg.Connection, split_path: Path, tmp_path: Path) -> tuple[DatasetVersion, DatasetVersion]:
    """The test model's validation version and a training version of the original rows."""
    name, root = name_of(conn), str(tmp_path / "datasets")
    originals = digits_data(split_path)
    validation = freeze_validation(conn=conn, model_name=name, originals=originals, schema=SCHEMA, root_url=root)
    dataset = compile_training(conn=conn, model_name=name, schema=SCHEMA, originals=originals,
                               validation=validation, root_url=root)  # fmt: skip
    return validation, dataset


def linear_trainer(request: TrainRequest) -> Trained:
    """A trainer defined here: a linear model on the flattened pixels."""
    TRAINED.append(request)
    model = Normalised(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), scale=16.0)
    history = train(model, request.train.inputs, request.train.labels, request.config,
                    x_validation=request.validation.inputs, y_validation=request.validation.labels)  # fmt: skip
    return Trained(module=model, history=history)


def test_the_trainer_a_spec_names_is_found_and_given_the_version_folders(
    conn: psycopg.Connection, split_path: Path, tmp_path: Path, tracking: Tracking
) -> None:
    name = name_of(conn)
    validation, dataset = compiled(conn, split_path, tmp_path)
    spec = SPEC.model_copy(update={"trainer": f"{__name__}:linear_trainer"})
    result = retrain(conn=conn, model_name=name, dataset=dataset, tracking=tracking, config=TrainConfig(epochs=3),
                     spec=spec)  # fmt: skip
    (request,) = TRAINED[-1:]
    assert request.train.folder == Path(dataset.uri) and request.validation.folder == Path(validation.uri)
    assert len(request.train.labels) == dataset.rows and request.config.epochs == 3
    assert result.promotion.decision is Decision.PROMOTED
    stored = store.get(result.build.stored.tag)
    assert stored.card.model_spec.trainer == f"{__name__}:linear_trainer"  # the next retrain finds it again
    assert stored.card.parity_max_abs_diff < 1e-4
    assert result.evaluation.accuracy > 0.5  # ten classes: it did train


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        ("tests.data.nowhere:train", "module 'tests.data.nowhere' cannot be imported"),
        (f"{__name__}:no_such_trainer", f"module '{__name__}' has no 'no_such_trainer'"),
        (f"{__name__}:SPEC", "'SPEC' is a ModelSpec, not a function"),
    ],
)
def test_a_spec_naming_a_missing_trainer_is_refused_before_training(
    conn: psycopg.Connection, split_path: Path, tmp_path: Path, tracking: Tracking, trainer: str, message: str
) -> None:
    name = name_of(conn)
    _, dataset = compiled(conn, split_path, tmp_path)
    spec = SPEC.model_copy(update={"trainer": trainer})
    with pytest.raises(rs.Invalid, match=f"{name} cannot be retrained: trainer '{trainer}': {message}"):
        retrain(conn=conn, model_name=name, dataset=dataset, tracking=tracking, spec=spec)
    assert not store.exists(f"{name}:latest")
    assert tracking.client().search_experiments(filter_string=f"name = '{name}'") == []
    assert dataset_store.promotions(conn=conn, model_name=name) == []
