from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_score, recall_score

from models.evaluate import evaluate, expected_calibration_error

pytestmark = pytest.mark.unit


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Four samples at confidence 0.75, three of them right: perfectly calibrated.
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_ece_of_an_overconfident_model() -> None:
    # Confidence 0.9 on everything, half right: gap 0.4 over all samples.
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_ece_weights_bins_by_their_share() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1])
    # bin at 0.95: accuracy 1, gap 0.05, share 0.5; bin at 0.55: accuracy 0, gap 0.55, share 0.5
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.05 + 0.5 * 0.55)


def test_evaluate_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=300)
    probs = rng.dirichlet(np.ones(4), size=300)
    probs[np.arange(150), labels[:150]] += 1.0  # make half of them right
    probs /= probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    result = evaluate(probs, labels, ["a", "b", "c", "d"])
    assert result.accuracy == pytest.approx(float((predicted == labels).mean()))
    assert result.confusion == confusion_matrix(labels, predicted).tolist()
    precision = precision_score(labels, predicted, average=None)
    recall = recall_score(labels, predicted, average=None)
    for i, name in enumerate("abcd"):
        assert result.per_class[name].precision == pytest.approx(precision[i])
        assert result.per_class[name].recall == pytest.approx(recall[i])
    assert sum(f.support for f in result.per_class.values()) == 300
