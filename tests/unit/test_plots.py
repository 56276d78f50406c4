from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import NDArray

from models.evaluate import expected_calibration_error
from models.plots import (
    ERROR_FLOOR,
    confusion_matrix_figure,
    learning_curves,
    reliability_bins,
    reliability_diagram,
    save_png,
    validation_error_overlay,
)
from models.train import EpochMetrics, History

pytestmark = pytest.mark.unit


def _history() -> History:
    return History(
        epochs=[
            EpochMetrics(epoch=1, train_loss=2.0, train_error=0.5, validation_loss=2.2, validation_error=0.6),
            EpochMetrics(epoch=2, train_loss=1.0, train_error=0.1),  # no validation this epoch
            EpochMetrics(epoch=3, train_loss=0.5, train_error=0.0, validation_loss=0.7, validation_error=0.0),
        ]
    )


def _lines(figure: Figure, index: int) -> dict[str, tuple[list[float], list[float]]]:
    axes = figure.axes[index]
    return {
        str(line.get_label()): (
            np.asarray(line.get_xdata(), dtype=float).tolist(),
            np.asarray(line.get_ydata(), dtype=float).tolist(),
        )
        for line in axes.get_lines()
    }


def test_learning_curves_are_log_log() -> None:
    figure = learning_curves(_history())
    assert len(figure.axes) == 2
    for axes in figure.axes:
        assert axes.get_xscale() == "log"
        assert axes.get_yscale() == "log"
        assert axes.get_legend() is not None


def test_learning_curves_plot_the_history_with_errors_floored() -> None:
    figure = learning_curves(_history())
    loss = _lines(figure, 0)
    error = _lines(figure, 1)
    assert loss["train"] == ([1.0, 2.0, 3.0], [2.0, 1.0, 0.5])
    # Validation only where it was measured.
    assert loss["validation"] == ([1.0, 3.0], [2.2, 0.7])
    assert error["train"] == ([1.0, 2.0, 3.0], [0.5, 0.1, ERROR_FLOOR])
    assert error["validation"] == ([1.0, 3.0], [0.6, ERROR_FLOOR])


def test_learning_curves_without_validation_draw_only_train() -> None:
    history = History(epochs=[EpochMetrics(epoch=e, train_loss=1.0 / e, train_error=0.1) for e in (1, 2)])
    figure = learning_curves(history)
    assert set(_lines(figure, 0)) == {"train"}
    assert set(_lines(figure, 1)) == {"train"}


def test_confusion_matrix_writes_every_count_and_names() -> None:
    confusion = [[5, 1, 0], [2, 7, 3], [0, 4, 11]]
    names = ["cat", "dog", "eel"]
    figure = confusion_matrix_figure(confusion, names)
    axes = figure.axes[0]
    texts = sorted(int(t.get_text()) for t in axes.texts)
    assert texts == sorted(v for row in confusion for v in row)
    # Cell (row=true, column=predicted) carries its own count.
    placed = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in axes.texts}
    assert placed == {(r, c): confusion[r][c] for r in range(3) for c in range(3)}
    assert [t.get_text() for t in axes.get_xticklabels()] == names
    assert [t.get_text() for t in axes.get_yticklabels()] == names
    assert axes.get_xlabel() == "predicted label"
    assert axes.get_ylabel() == "true label"


def test_confusion_matrix_rejects_a_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix_figure([[1, 2], [3, 4]], ["a", "b", "c"])


def _ece_from_bins(probabilities: NDArray[np.float64], labels: NDArray[np.int64], n_bins: int) -> float:
    bins = reliability_bins(probabilities, labels, n_bins)
    total = sum(b.count for b in bins)
    return sum(b.count * abs(b.accuracy - b.confidence) for b in bins if b.count) / total


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_reliability_bins_reproduce_ece_on_random_data(n_bins: int) -> None:
    rng = np.random.default_rng(1234)
    logits = rng.normal(size=(2000, 10)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=2000)
    # Make the model right more often than chance so accuracy varies across bins.
    labels[:1200] = probabilities[:1200].argmax(axis=1)
    bins = reliability_bins(probabilities, labels, n_bins)
    assert len(bins) == n_bins
    assert sum(b.count for b in bins) == 2000
    assert _ece_from_bins(probabilities, labels, n_bins) == pytest.approx(
        expected_calibration_error(probabilities, labels, n_bins)
    )


def test_reliability_bins_on_a_calibrated_hand_made_case() -> None:
    # Confidence 0.9 on all ten samples, nine right: perfectly calibrated, one non-empty bin.
    probabilities = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 9 + [1])
    bins = reliability_bins(probabilities, labels)
    full = [b for b in bins if b.count]
    assert len(full) == 1
    (only,) = full
    assert only.count == 10
    assert only.lower < 0.9 <= only.upper
    assert only.accuracy == pytest.approx(0.9)
    assert only.confidence == pytest.approx(0.9)
    assert all(math.isnan(b.accuracy) and math.isnan(b.confidence) for b in bins if not b.count)
    assert _ece_from_bins(probabilities, labels, 15) == pytest.approx(0.0)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)


def test_reliability_bins_edges_follow_evaluate() -> None:
    # With 4 bins the edges are exact binary fractions, so confidences can sit on them: an edge value
    # belongs to the bin below it ((0.25, 0.5] holds 0.5), and a confidence of 0 joins bin 0.
    probabilities = np.array([[0.5, 0.3, 0.2], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    labels = np.array([0, 0, 0, 0])
    bins = reliability_bins(probabilities, labels, n_bins=4)
    assert [b.count for b in bins] == [2, 1, 0, 1]
    assert [(b.lower, b.upper) for b in bins] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    expected = expected_calibration_error(probabilities, labels, 4)
    assert _ece_from_bins(probabilities, labels, 4) == pytest.approx(expected)


def test_reliability_diagram_shows_ece_diagonal_and_shares() -> None:
    rng = np.random.default_rng(7)
    probabilities = rng.dirichlet(np.ones(4), size=500)
    labels = rng.integers(0, 4, size=500)
    figure = reliability_diagram(probabilities, labels, n_bins=10)
    accuracy_axes, share_axes = figure.axes
    assert f"{expected_calibration_error(probabilities, labels, 10):.4f}" in accuracy_axes.get_title()
    diagonal = _lines(figure, 0)["perfect calibration"]
    assert diagonal == ([0.0, 1.0], [0.0, 1.0])
    bins = reliability_bins(probabilities, labels, 10)
    heights = [patch.get_height() for patch in accuracy_axes.patches if isinstance(patch, Rectangle)]
    assert heights == pytest.approx([b.accuracy if b.count else 0.0 for b in bins])
    shares = [patch.get_height() for patch in share_axes.patches if isinstance(patch, Rectangle)]
    assert shares == pytest.approx([b.count / 500 for b in bins])
    assert sum(shares) == pytest.approx(1.0)


def test_validation_error_overlay_draws_one_line_per_run() -> None:
    curves = {"baseline": [(1, 0.4), (2, 0.2), (4, 0.0)], "wider": [(1, 0.3), (2, 0.1)]}
    figure = validation_error_overlay(curves, title="Runs")
    axes = figure.axes[0]
    lines = _lines(figure, 0)
    assert set(lines) == {"baseline", "wider"}
    assert lines["baseline"] == ([1.0, 2.0, 4.0], [0.4, 0.2, ERROR_FLOOR])
    assert lines["wider"] == ([1.0, 2.0], [0.3, 0.1])
    assert axes.get_xscale() == "log"
    assert axes.get_yscale() == "log"
    assert axes.get_title() == "Runs"
    legend = axes.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["baseline", "wider"]


def test_save_png_writes_a_png_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "deeper" / "curves.png"
    returned = save_png(learning_curves(_history()), target)
    assert returned == target
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
