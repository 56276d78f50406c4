"""Train, evaluate, export, check and store the default digits model, in that order.

Any failing step stops the chain: nothing reaches the store without passing parity.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import digits, export, store
from models.evaluate import Evaluation, evaluate
from models.network import DigitsCNN
from models.provenance import code_version
from models.signature import Signature, softmax
from models.train import (
    EpochMetrics,
    History,
    Normalised,
    TrainConfig,
    predict_logits,
    seed_everything,
    train,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = digits.DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class BuildResult:
    stored: store.StoredModel
    evaluation: Evaluation
    history: History
    parity_max_abs_diff: float


def digits_signature() -> Signature:
    return Signature(
        input_shape=digits.INPUT_SHAPE,
        class_names=digits.CLASS_NAMES,
        dtype="float32",
        min_value=0.0,
        max_value=digits.PIXEL_MAX,
    )


def new_digits_model(seed: int) -> Normalised:
    """A freshly initialised network; its initial weights depend only on `seed`."""
    seed_everything(seed)
    return Normalised(DigitsCNN(num_classes=len(digits.CLASS_NAMES)), scale=digits.PIXEL_MAX)


def build_digits_model(
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
    x_train, y_train = data.images[train_idx], data.labels[train_idx]
    x_val, y_val = data.images[val_idx], data.labels[val_idx]

    model = new_digits_model(config.seed)
    history = train(model, x_train, y_train, config, x_validation=x_val, y_validation=y_val, on_epoch=on_epoch)
    evaluation = evaluate(softmax(predict_logits(model, x_val)), y_val, digits.CLASS_NAMES)
    logger.info("validation accuracy %.4f, ECE %.4f", evaluation.accuracy, evaluation.ece)

    signature = digits_signature()
    rng = np.random.default_rng(config.seed)
    parity_inputs = [
        x_val,
        x_val[:1],
        rng.uniform(signature.min_value, signature.max_value, size=(64, *signature.input_shape)).astype(np.float32),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export.export_onnx(
            model,
            Path(tmp) / store.ONNX_FILE,
            sample_shape=signature.input_shape,
            input_name=signature.input_name,
            output_name=signature.output_name,
        )
        parity = export.check_parity(model, onnx_path, parity_inputs)
        card = store.ModelCard(
            signature=signature,
            metrics=evaluation.summary(),
            dataset_id=split.dataset_id,
            validation_id=split.split_id,
            opset=export.OPSET,
            code_version=code_version(),
            parity_max_abs_diff=parity,
            extra={"train": config.to_dict(), "per_class": _per_class(evaluation)},
        )
        stored = store.save(name, onnx_path, card)
    return BuildResult(stored=stored, evaluation=evaluation, history=history, parity_max_abs_diff=parity)


def _per_class(evaluation: Evaluation) -> dict[str, dict[str, float]]:
    return {
        name: {"precision": f.precision, "recall": f.recall, "support": float(f.support)}
        for name, f in evaluation.per_class.items()
    }
