"""Retrain → evaluate → gate → promote, every run logged to MLflow; promotions announced on Redis.

The gate and the champion's bookkeeping live in `feedback.champion`; this module trains.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from numpy.typing import NDArray
from pydantic import ValidationError

from feedback.champion import (
    Decision,
    Promotion,
    champion_or_baseline,
    evaluation_on,
    gate,
    record_evaluation,
    record_promotion,
)
from feedback.datasets.live import current_live
from feedback.datasets.store import DatasetVersion, Kind, current_validation
from feedback.datasets.versions import Loaded, read_version, verify
from feedback.errors import Invalid
from feedback.tracking import Tracking
from models import builtin, plots, store
from models.evaluate import Evaluation, evaluate_stored
from models.finetune import Unconvertible
from models.pipeline import BuildResult, train_and_store, trainer_of
from models.provenance import code_version
from models.spec import ModelSpec
from models.train import EpochMetrics, TrainConfig
from models.trainers import FINE_TUNE, Examples, Trainer, TrainerNotFound, check_before_training

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainResult:
    build: BuildResult
    run_id: str
    evaluation: Evaluation
    promotion: Promotion


# -- retraining -----------------------------------------------------------------------------------


def retrain(
    *,
    conn: psycopg.Connection,
    model_name: str,
    dataset: DatasetVersion,
    tracking: Tracking,
    config: TrainConfig | None = None,
    margin: float = 0.0,
    announcer: Callable[[str, str], None] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    spec: ModelSpec | None = None,
    trainer: str | None = None,
) -> RetrainResult:
    """Train on `dataset` with the trainer of the model's spec (`builtin.spec_of`, unless `spec` is
    given; `trainer` replaces the spec's, and the candidate is stored with it, so later retrains use
    it too), evaluate on the current validation version, log the run, gate, promote.

    Everything that can be refused (the versions, the trainer, a graph fine-tuning cannot convert)
    is checked before training starts."""
    config = config or TrainConfig()
    plan = _plan(conn, model_name, dataset, spec=spec, trainer=trainer)
    validation, val_rows = plan.validation, plan.val_rows
    champion = champion_or_baseline(conn, model_name, validation, rows=val_rows)

    client = tracking.client()
    run = client.create_run(
        tracking.experiment_id(client, model_name),
        run_name=f"{model_name} on {dataset.id[:8]}",
        tags={"dataset_id": dataset.id, "validation_id": validation.id, "code_version": code_version()},
    )
    run_id = run.info.run_id
    try:
        build = _build(client, run_id, plan, model_name=model_name, dataset=dataset, config=config, on_epoch=on_epoch)
        version = build.stored.version
        evaluation, probabilities = evaluate_stored(build.stored, val_rows.inputs, val_rows.labels)
        record_evaluation(conn, model_name, version, validation.id, evaluation)
        promotion = _gate(
            conn, model_name, version, evaluation, champion=champion, validation=validation, rows=val_rows,
            dataset=dataset, margin=margin, run_id=run_id,
        )  # fmt: skip
        _log_outcome(
            client,
            run_id,
            build=build,
            evaluation=evaluation,
            probabilities=probabilities,
            labels=val_rows.labels,
            promotion=promotion,
        )
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    logger.info("%s:%s %s: %s", model_name, version, promotion.decision.value, promotion.reason)
    if promotion.decision is Decision.PROMOTED and announcer is not None:
        announcer(model_name, version)
    return RetrainResult(build=build, run_id=run_id, evaluation=evaluation, promotion=promotion)


@dataclass(frozen=True)
class _Plan:
    """What a retrain trains with, every check passed."""

    spec: ModelSpec
    trainer: Trainer
    base: store.StoredModel | None  # the model's own graph, which fine-tuning starts from
    validation: DatasetVersion
    train_rows: Loaded
    val_rows: Loaded


def _plan(
    conn: psycopg.Connection, model_name: str, dataset: DatasetVersion, *, spec: ModelSpec | None, trainer: str | None
) -> _Plan:
    """Everything a retrain needs, checked before any run starts; `Invalid` naming what is refused."""
    validation = validation_for(conn, model_name, dataset)
    spec, train_with, base = trainer_for(model_name, spec or builtin.spec_of(model_name), trainer)
    if list(spec.classes) != dataset.manifest["label_schema"]["class_names"]:
        raise Invalid(f"{dataset.id} was compiled for other classes than {model_name}'s spec names")
    verify(dataset.uri, dataset.id)
    train_rows, val_rows = read_version(dataset.uri), read_version(validation.uri)
    # Items can be relabelled in a later validation version, never added: the hold-out still holds.
    if set(train_rows.item_ids) & set(val_rows.item_ids):
        raise Invalid(f"{dataset.id} shares items with validation version {validation.id}")
    return _Plan(spec, train_with, base, validation, train_rows, val_rows)


def _build(
    client: MlflowClient,
    run_id: str,
    plan: _Plan,
    *,
    model_name: str,
    dataset: DatasetVersion,
    config: TrainConfig,
    on_epoch: Callable[[EpochMetrics], None] | None,
) -> BuildResult:
    """Log the run's parameters, train, export and store the candidate."""
    base, validation = plan.base, plan.validation
    params = {
        **_params(config, dataset, validation),
        "trainer": plan.spec.trainer,
        "base_version": "" if base is None else base.version,
    }
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return train_and_store(
        name=model_name,
        spec=plan.spec,
        trainer=plan.trainer,
        base=None if base is None else base.onnx_path,
        train=Examples(plan.train_rows.inputs, plan.train_rows.labels, folder=_local(dataset.uri)),
        validation=Examples(plan.val_rows.inputs, plan.val_rows.labels, folder=_local(validation.uri)),
        dataset_id=dataset.id,
        validation_id=validation.id,
        config=config,
        on_epoch=_epoch_logger(client, run_id, on_epoch),
        extra={"mlflow_run_id": run_id, **({} if base is None else {"base_version": base.version})},
    )


def validation_for(
    conn: psycopg.Connection,
    model_name: str,
    dataset: DatasetVersion,
    *,
    kinds: tuple[Kind, ...] = (Kind.TRAINING,),
    taker: str = "retrain",
) -> DatasetVersion:
    """The model's current validation version; `Invalid` unless `dataset` is a version of the model
    of one of `kinds` (`taker` names what takes it, in the refusal)."""
    if dataset.kind not in kinds:
        wanted = " or ".join(k.value for k in kinds)
        raise Invalid(f"{dataset.id} is a {dataset.kind.value} version; {taker} takes a {wanted} version")
    if dataset.model_name != model_name:
        raise Invalid(f"{dataset.id} was compiled for {dataset.model_name}, not {model_name}")
    validation = current_validation(conn=conn, model_name=model_name)
    if validation is None:
        raise Invalid(f"{model_name} has no validation version")
    return validation


def _epoch_logger(
    client: MlflowClient, run_id: str, on_epoch: Callable[[EpochMetrics], None] | None
) -> Callable[[EpochMetrics], None]:
    """Log each epoch's figures to the run, then pass them on to `on_epoch`."""

    def log_epoch(m: EpochMetrics) -> None:
        values = {
            "train_loss": m.train_loss,
            "train_error": m.train_error,
            "validation_loss": m.validation_loss,
            "validation_error": m.validation_error,
        }
        now = _millis()
        client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, m.epoch) for k, v in values.items() if v is not None]
        )
        if on_epoch is not None:
            on_epoch(m)

    return log_epoch


def _gate(
    conn: psycopg.Connection,
    model_name: str,
    version: str,
    evaluation: Evaluation,
    *,
    champion: Promotion | None,
    validation: DatasetVersion,
    rows: Loaded,
    dataset: DatasetVersion,
    margin: float,
    run_id: str,
) -> Promotion:
    """The candidate against the champion on the same validation version, the decision recorded."""
    champion_accuracy = (
        None if champion is None else evaluation_on(conn, model_name, champion.model_version, validation, rows=rows)
    )
    promoted, reason = gate(evaluation.accuracy, champion_accuracy, margin)
    return record_promotion(
        live_validation=live_figures(conn, model_name, version, champion),
        conn=conn,
        model_name=model_name,
        model_version=version,
        decision=Decision.PROMOTED if promoted else Decision.REJECTED,
        reason=reason,
        validation_id=validation.id,
        dataset_id=dataset.id,
        accuracy=evaluation.accuracy,
        champion_version=None if champion is None else champion.model_version,
        champion_accuracy=champion_accuracy,
        margin=margin,
        run_id=run_id,
    )


def live_figures(
    conn: psycopg.Connection, model_name: str, version: str, champion: Promotion | None
) -> dict[str, Any] | None:
    """The candidate's and the champion's accuracy on the model's live validation version, if it has one."""
    found = current_live(conn=conn, model_name=model_name)
    if found is None:
        return None
    rows = read_version(found.uri)
    figures: dict[str, Any] = {"id": found.id, "samples": found.rows}
    figures["accuracy"] = evaluation_on(conn, model_name, version, found, rows=rows)
    if champion is not None:
        figures["champion_accuracy"] = evaluation_on(conn, model_name, champion.model_version, found, rows=rows)
    return figures


def trainer_for(
    model_name: str, spec: ModelSpec, trainer: str | None
) -> tuple[ModelSpec, Trainer, store.StoredModel | None]:
    """The spec to train by (with `trainer` in place of its own), its trainer, and the model's own
    graph; `Invalid` for a trainer that is missing or refuses the graph, before any run starts."""
    if trainer is not None:
        try:
            spec = ModelSpec.model_validate({**spec.to_dict(), "trainer": trainer})
        except ValidationError:
            raise Invalid(f"trainer {trainer!r} is not of the form package.module:function") from None
    base = own_graph(model_name)
    try:
        train_with = trainer_of(spec)
        assert spec.trainer is not None  # trainer_of refuses a spec without one
        check_before_training(spec.trainer, None if base is None else base.onnx_path)
    except TrainerNotFound as exc:
        hint = f"; to fine-tune its own graph, retrain with --trainer {FINE_TUNE}" if base is not None else ""
        raise Invalid(f"{model_name} cannot be retrained: {exc}{hint}") from None
    except Unconvertible as exc:
        raise Invalid(f"{model_name} cannot be retrained with {spec.trainer}: {exc}") from None
    return spec, train_with, base


def own_graph(model_name: str) -> store.StoredModel | None:
    """The graph a team brought: the newest version of `model_name` that was imported (the one
    fine-tuning starts from, so every fine-tune of the same data gives the same model); None for
    a model that was never imported."""
    imported = [m for m in store.list_models(model_name) if "imported_from" in m.card.extra]
    return imported[-1] if imported else None


def _local(uri: str) -> Path | None:
    """A version's folder when it is on this machine (a trainer may read its files)."""
    path = Path(uri)
    return path if "://" not in uri and path.is_dir() else None


def _params(config: TrainConfig, dataset: DatasetVersion, validation: DatasetVersion) -> dict[str, Any]:
    return {
        **config.to_dict(),
        "dataset_id": dataset.id,
        "dataset_rows": dataset.rows,
        "dataset_watermark": dataset.watermark,
        "validation_id": validation.id,
        "validation_rows": validation.rows,
        "code_version": code_version(),
    }


def _log_outcome(
    client: MlflowClient,
    run_id: str,
    *,
    build: BuildResult,
    evaluation: Evaluation,
    probabilities: NDArray[np.float32],
    labels: NDArray[np.int64],
    promotion: Promotion,
) -> None:
    now = _millis()
    figures = {"accuracy": evaluation.accuracy, "ece": evaluation.ece, "parity_max_abs_diff": build.parity_max_abs_diff}
    for name, f in evaluation.per_class.items():
        figures[f"recall_{name}"] = f.recall
        figures[f"precision_{name}"] = f.precision
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in figures.items()])
    for key, value in {
        "model_version": build.stored.version,
        "decision": promotion.decision.value,
        "decision_reason": promotion.reason,
        "champion_version": promotion.champion_version or "",
    }.items():
        client.set_tag(run_id, key, value)
    class_names = build.stored.card.signature.class_names
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plots.save_png(plots.learning_curves(build.history), folder / "learning_curves.png")
        plots.save_png(plots.confusion_matrix_figure(evaluation.confusion, class_names), folder / "confusion.png")
        plots.save_png(plots.reliability_diagram(probabilities, labels), folder / "reliability.png")
        (folder / "evaluation.json").write_text(json.dumps(evaluation.to_dict(), indent=2, default=str))
        client.log_artifacts(run_id, str(folder))


def _millis() -> int:
    return int(time.time() * 1000)
