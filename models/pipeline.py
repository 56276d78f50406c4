"""Train, evaluate, export, check and store a model, in that order, whatever its trainer.

Any failing step stops the chain: nothing reaches the store without passing parity.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from models import digits, export, store
from models.digits import digits_signature, digits_spec
from models.evaluate import Evaluation, evaluate
from models.network import WideMLP
from models.provenance import code_version
from models.signature import Signature, to_probabilities
from models.spec import ModelSpec
from models.train import EpochMetrics, History, Normalised, TrainConfig, predict_logits, seed_everything
from models.trainers import Examples, Trainer, TrainerNotFound, TrainRequest, load_trainer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = digits.DEFAULT_MODEL_NAME
PARITY_SAMPLES = 512  # validation samples run through both graphs at export


@dataclass(frozen=True)
class BuildResult:
    stored: store.StoredModel
    evaluation: Evaluation
    history: History
    parity_max_abs_diff: float
    validation_probabilities: NDArray[np.float32]


def build_bundled_model(
    *,
    name: str = DEFAULT_MODEL_NAME,
    split_path: Path,
    config: TrainConfig | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> BuildResult:
    """Train the digits CNN on the frozen split's training rows and save it to the model store."""
    config = config or TrainConfig()
    data = digits.load()
    split = digits.load_or_create_split(split_path, data, seed=config.seed)
    train_idx = np.asarray(split.train_indices)
    val_idx = np.asarray(split.validation_indices)
    return train_and_store(
        name=name,
        spec=digits_spec(),
        train=Examples(data.images[train_idx], data.labels[train_idx]),
        validation=Examples(data.images[val_idx], data.labels[val_idx]),
        dataset_id=split.dataset_id,
        validation_id=split.split_id,
        config=config,
        on_epoch=on_epoch,
    )


def trainer_of(spec: ModelSpec) -> Trainer:
    """The trainer the spec names; `TrainerNotFound` when it names none or one that is not there."""
    if spec.trainer is None:
        raise TrainerNotFound("the model's spec names no trainer (add `trainer: package.module:function`)")
    return load_trainer(spec.trainer)


def train_and_store(
    *,
    name: str,
    spec: ModelSpec,
    train: Examples,
    validation: Examples,
    dataset_id: str,
    validation_id: str,
    config: TrainConfig,
    trainer: Trainer | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    extra: dict[str, Any] | None = None,
    base: Path | None = None,
) -> BuildResult:
    """Train with the spec's trainer (or `trainer`), evaluate, export, check parity, save: in that order.
    `base`: the model's own ONNX graph, handed to the trainer (fine-tuning starts from it)."""
    trainer = trainer or trainer_of(spec)
    trained = trainer(
        TrainRequest(spec=spec, train=train, validation=validation, config=config, on_epoch=on_epoch, base=base)
    )
    model = trained.module.eval()
    probabilities = to_probabilities(predict_logits(model, validation.inputs), spec.output_kind)
    if probabilities.shape != (len(validation.labels), len(spec.classes)):
        raise ValueError(
            f"the trainer's module answers {list(probabilities.shape[1:])} scores per sample; "
            f"the spec names {len(spec.classes)} classes"
        )
    evaluation = evaluate(probabilities, validation.labels, spec.classes)
    logger.info("validation accuracy %.4f, ECE %.4f", evaluation.accuracy, evaluation.ece)

    signature = spec.signature()
    rng = np.random.default_rng(config.seed)
    parity_inputs = [
        validation.inputs[:PARITY_SAMPLES],
        validation.inputs[:1],
        rng.uniform(signature.min_value, signature.max_value, size=(64, *signature.input_shape)).astype(np.float32),
    ]
    stored = export_and_store(
        model,
        name=name,
        signature=signature,
        spec=spec,
        parity_inputs=parity_inputs,
        metrics=evaluation.summary(),
        dataset_id=dataset_id,
        validation_id=validation_id,
        extra={"train": config.to_dict(), "per_class": _per_class(evaluation), **(extra or {})},
        graph=trained.graph,
    )
    return BuildResult(
        stored=stored,
        evaluation=evaluation,
        history=trained.history,
        parity_max_abs_diff=stored.card.parity_max_abs_diff,
        validation_probabilities=probabilities,
    )


def _per_class(evaluation: Evaluation) -> dict[str, dict[str, float]]:
    return {
        name: {"precision": f.precision, "recall": f.recall, "support": float(f.support)}
        for name, f in evaluation.per_class.items()
    }


def build_wide_model(*, name: str = "digits-wide", seed: int = 0) -> store.StoredModel:
    """The benchmark's compute-bound model: `WideMLP` with seeded random weights (never trained),
    the digits signature, exported and parity-checked like any other model."""
    signature = digits_signature()
    seed_everything(seed)
    model = Normalised(
        WideMLP(inputs=int(np.prod(signature.input_shape)), num_classes=len(signature.class_names)),
        scale=signature.max_value,
    ).eval()
    rng = np.random.default_rng(seed)
    inputs = [rng.uniform(0, signature.max_value, size=(n, *signature.input_shape)).astype(np.float32) for n in (1, 64)]
    return export_and_store(
        model,
        name=name,
        signature=signature,
        parity_inputs=inputs,
        metrics={},
        dataset_id="none: random weights",
        validation_id="none",
        extra={"purpose": "benchmark: compute-bound, untrained", "seed": seed},
    )


def export_and_store(
    model: torch.nn.Module,
    *,
    name: str,
    signature: Signature,
    spec: ModelSpec | None = None,
    parity_inputs: list[NDArray[np.float32]],
    metrics: dict[str, float],
    dataset_id: str,
    validation_id: str,
    extra: dict[str, Any],
    graph: bytes | None = None,
) -> store.StoredModel:
    """Export to ONNX (unless the trainer made its `graph`), check it against PyTorch on
    `parity_inputs` (raises past the tolerance), and save it to the store with its card: nothing
    is stored that failed parity."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / store.ONNX_FILE
        if graph is not None:
            onnx_path.write_bytes(graph)
        else:
            export.export_onnx(
                model,
                onnx_path,
                sample_shape=signature.input_shape,
                input_name=signature.input_name,
                output_name=signature.output_name,
            )
        parity = export.check_parity(model, onnx_path, parity_inputs)
        card = store.ModelCard(
            signature=signature,
            metrics=metrics,
            dataset_id=dataset_id,
            validation_id=validation_id,
            opset=export.OPSET if graph is None else export.opset_of(onnx_path),
            code_version=code_version(),
            parity_max_abs_diff=parity,
            extra=extra,
            spec=spec,
        )
        return store.save(name, onnx_path, card, reference_inputs=parity_inputs[0])
