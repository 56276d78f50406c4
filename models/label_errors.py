"""Likely label errors in a training set, by confident learning (Northcutt et al., 2021).

Every row is scored by a model that never saw it: the rows are split into stratified folds, the
model's own trainer trains on all folds but one and predicts the one left out. cleanlab then
estimates the joint distribution of given and true labels from those out-of-sample probabilities,
keeps the rows it counts as off-diagonal, and ranks them by self-confidence (the out-of-sample
probability of the label a row was given), lowest first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import StratifiedKFold

from models.signature import to_probabilities
from models.spec import ModelSpec
from models.train import TrainConfig, predict_logits
from models.trainers import Examples, Trainer, TrainRequest

logger = logging.getLogger(__name__)

FOLDS = 5


@dataclass(frozen=True)
class Suspect:
    index: int  # the row's place in the labels given
    quality: float  # self-confidence: the out-of-sample probability of the label it was given
    suggested: int  # the class the out-of-sample model finds most probable


def out_of_sample(
    spec: ModelSpec,
    trainer: Trainer,
    rows: Examples,
    validation: Examples,
    *,
    config: TrainConfig,
    folds: int = FOLDS,
    base: Path | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> NDArray[np.float32]:
    """Each row's class probabilities from a model trained (by `trainer`, with `config`) on the
    other folds; `validation` is what each training reports on (never the rows scored)."""
    classes = len(spec.classes)
    counts = np.bincount(rows.labels, minlength=classes)
    smallest = int(counts[counts > 0].min()) if counts.any() else 0
    if folds < 2 or smallest < folds:
        raise ValueError(
            f"{folds} folds need at least {max(folds, 2)} rows of every class present; the smallest has {smallest}"
        )
    probabilities = np.zeros((len(rows.labels), classes), dtype=np.float32)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    for k, (fit, held) in enumerate(split.split(np.zeros(len(rows.labels)), rows.labels)):
        request = TrainRequest(
            spec=spec,
            train=Examples(rows.inputs[fit], rows.labels[fit]),
            validation=validation,
            config=config,
            base=base,
        )
        module = trainer(request).module.eval()
        probabilities[held] = to_probabilities(predict_logits(module, rows.inputs[held]), spec.output_kind)
        logger.info("fold %d of %d: %d rows scored", k + 1, folds, len(held))
        if on_fold is not None:
            on_fold(k + 1, folds)
    return probabilities


def rank(labels: NDArray[np.int64], probabilities: NDArray[np.float32]) -> list[Suspect]:
    """The rows whose given label is probably wrong, most likely first (cleanlab's
    `find_label_issues`, pruned by noise rate, ranked by self-confidence)."""
    from cleanlab.filter import find_label_issues

    if len(labels) == 0:
        return []
    found = find_label_issues(
        labels=labels, pred_probs=probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    return [
        Suspect(index=int(i), quality=float(probabilities[i, labels[i]]), suggested=int(probabilities[i].argmax()))
        for i in found
    ]
