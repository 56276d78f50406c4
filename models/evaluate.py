"""Evaluation: accuracy as the headline, per-class figures, confusion matrix, calibration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.runtime import DevicePreference, OnnxModel
from models.signature import to_probabilities
from models.store import StoredModel


@dataclass(frozen=True)
class ClassFigures:
    precision: float
    recall: float
    support: int


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    ece: float
    per_class: dict[str, ClassFigures]
    confusion: list[list[int]]
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """Flat figures fit for model metadata and experiment trackers."""
        return {"accuracy": self.accuracy, "ece": self.ece, "samples": float(self.samples)}


def expected_calibration_error(
    probabilities: NDArray[np.floating[Any]], labels: NDArray[np.integer[Any]], n_bins: int = 15
) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin i holds confidences in (edge[i], edge[i+1]]; a confidence of exactly 0 joins bin 0.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = abs(float(correct[in_bin].mean()) - float(confidences[in_bin].mean()))
            ece += gap * float(in_bin.mean())
    return ece


def evaluate(
    probabilities: NDArray[np.floating[Any]],
    labels: NDArray[np.integer[Any]],
    class_names: Sequence[str],
) -> Evaluation:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # a second's import, when used

    predicted = probabilities.argmax(axis=1)
    classes = list(range(len(class_names)))
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    per_class = {
        name: ClassFigures(precision=float(p), recall=float(r), support=int(s))
        for name, p, r, s in zip(class_names, precision, recall, support, strict=True)
    }
    return Evaluation(
        accuracy=float((predicted == labels).mean()),
        ece=expected_calibration_error(probabilities, labels),
        per_class=per_class,
        confusion=confusion_matrix(labels, predicted, labels=classes).tolist(),
        samples=len(labels),
    )


def evaluate_stored(
    stored: StoredModel, x: NDArray[np.float32], y: NDArray[np.int64], *, batch_size: int = 512
) -> tuple[Evaluation, NDArray[np.float32]]:
    """Evaluate a stored model's ONNX graph (what is served) on labelled data, on the CPU."""
    runtime = OnnxModel(stored.onnx_path, device=DevicePreference.CPU)
    logits = np.concatenate([runtime.run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    probabilities = to_probabilities(logits, stored.card.model_spec.output_kind)
    return evaluate(probabilities, y, stored.card.signature.class_names), probabilities
