"""Matplotlib figures for experiment tracking, built without pyplot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import NDArray

if TYPE_CHECKING:  # the type only: plotting a report must not load torch
    from models.train import History

# Log axes cannot show an error of exactly 0 (a perfect epoch), so errors are clipped up to this floor.
ERROR_FLOOR = 1e-4


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin; an empty bin has count 0 and nan accuracy and confidence."""

    lower: float
    upper: float
    count: int
    accuracy: float
    confidence: float


def _clip_errors(errors: Sequence[float]) -> list[float]:
    return [max(error, ERROR_FLOOR) for error in errors]


def learning_curves(history: History) -> Figure:
    """Loss and error against epoch, train and validation, on log-log axes."""
    figure = Figure(figsize=(11, 4.5))
    loss_axes, error_axes = figure.subplots(1, 2)
    epochs = [m.epoch for m in history.epochs]
    loss_axes.plot(epochs, [m.train_loss for m in history.epochs], marker=".", label="train")
    error_axes.plot(epochs, _clip_errors([m.train_error for m in history.epochs]), marker=".", label="train")
    # Validation may be missing for some epochs (or all): plot only the epochs that have it.
    with_loss = [(m.epoch, m.validation_loss) for m in history.epochs if m.validation_loss is not None]
    if with_loss:
        x, y = zip(*with_loss, strict=True)
        loss_axes.plot(x, y, marker=".", label="validation")
    with_error = [(m.epoch, m.validation_error) for m in history.epochs if m.validation_error is not None]
    if with_error:
        x, y = zip(*with_error, strict=True)
        error_axes.plot(x, _clip_errors(y), marker=".", label="validation")
    loss_axes.set_title("Loss")
    loss_axes.set_ylabel("cross-entropy loss")
    error_axes.set_title("Error")
    error_axes.set_ylabel(f"error rate (floored at {ERROR_FLOOR:g})")
    for axes in (loss_axes, error_axes):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("epoch")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle("Learning curves")
    figure.tight_layout()
    return figure


def confusion_matrix_figure(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    """Counts as an image with each count written in its cell; true label on y, predicted on x."""
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n}) for {n} class names")
    size = max(4.0, 0.6 * n + 2.0)
    figure = Figure(figsize=(size + 1.0, size))
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    # White text on the dark cells, black on the light ones, so every count stays readable.
    threshold = counts.max() / 2 if counts.size else 0
    for row in range(n):
        for column in range(n):
            value = int(counts[row, column])
            axes.text(
                column,
                row,
                str(value),
                ha="center",
                va="center",
                color="white" if value > threshold else "black",
            )
    ticks = list(range(n))
    axes.set_xticks(ticks, labels=list(class_names))
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title("Confusion matrix")
    figure.tight_layout()
    return figure


def reliability_bins(
    probabilities: NDArray[np.floating[Any]], labels: NDArray[np.integer[Any]], n_bins: int = 15
) -> list[ReliabilityBin]:
    """Per-bin accuracy and mean confidence, binned exactly as `models.evaluate.expected_calibration_error`."""
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin i holds confidences in (edge[i], edge[i+1]]; a confidence of exactly 0 joins bin 0.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    assigned = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)
    bins: list[ReliabilityBin] = []
    for b in range(n_bins):
        in_bin = assigned == b
        count = int(in_bin.sum())
        accuracy = float(correct[in_bin].mean()) if count else float("nan")
        confidence = float(confidences[in_bin].mean()) if count else float("nan")
        bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), count, accuracy, confidence))
    return bins


def reliability_diagram(
    probabilities: NDArray[np.floating[Any]], labels: NDArray[np.integer[Any]], *, n_bins: int = 15
) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the share of samples below."""
    bins = reliability_bins(probabilities, labels, n_bins)
    total = sum(b.count for b in bins)
    ece = sum(b.count * abs(b.accuracy - b.confidence) for b in bins if b.count) / total if total else float("nan")
    lowers = [b.lower for b in bins]
    widths = [b.upper - b.lower for b in bins]
    figure = Figure(figsize=(5.5, 6.5))
    accuracy_axes: Axes
    share_axes: Axes
    accuracy_axes, share_axes = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    # Empty bins draw no bar: nan heights would otherwise warn and leave gaps anyway.
    accuracy_axes.bar(
        lowers,
        [0.0 if b.count == 0 else b.accuracy for b in bins],
        width=widths,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    accuracy_axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", label="perfect calibration")
    accuracy_axes.set_xlim(0.0, 1.0)
    accuracy_axes.set_ylim(0.0, 1.0)
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_title(f"Reliability diagram (ECE = {ece:.4f})")
    accuracy_axes.legend(loc="upper left")
    share_axes.bar(
        lowers,
        [b.count / total if total else 0.0 for b in bins],
        width=widths,
        align="edge",
        edgecolor="black",
        color="tab:grey",
    )
    share_axes.set_xlabel("confidence (max probability)")
    share_axes.set_ylabel("share of samples")
    figure.tight_layout()
    return figure


def validation_error_overlay(
    curves: Mapping[str, Sequence[tuple[int, float]]], *, title: str = "Validation error per epoch"
) -> Figure:
    """One validation-error line per run on log-log axes, for comparing runs."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for run, points in curves.items():
        epochs = [epoch for epoch, _ in points]
        errors = _clip_errors([error for _, error in points])
        axes.plot(epochs, errors, marker=".", label=run)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"validation error (floored at {ERROR_FLOOR:g})")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    if curves:
        axes.legend()
    figure.tight_layout()
    return figure


def accuracy_against_labels(
    series: Mapping[str, Sequence[tuple[int, float]]], *, target: float | None = None
) -> Figure:
    """Validation accuracy against labels spent, one line per named series (e.g. a sampling strategy)."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for name, points in series.items():
        labels, accuracy = zip(*points, strict=True) if points else ((), ())
        axes.plot(labels, accuracy, marker="o", label=name)
    if target is not None:
        axes.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    axes.set_xlabel("labels spent by reviewers")
    axes.set_ylabel("validation accuracy (frozen split)")
    axes.set_title("Validation accuracy against review effort")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def shadow_evidence(
    series: Mapping[str, Sequence[tuple[int, float | None, float | None, float]]],
    *,
    alpha: float,
    min_judged: int | None = None,
) -> Figure:
    """A shadow's evidence as it grew, one column per named shadow: above, the answers' and the
    shadow's accuracy on the judged items; below, McNemar's exact p (log scale) with `alpha` (and
    the policy's `min_judged` as a vertical line).
    Each point is (judged items, answers' accuracy, shadow's accuracy, p)."""
    figure = Figure(figsize=(5 * max(1, len(series)), 6))
    grid = figure.subplots(2, max(1, len(series)), squeeze=False, sharex="col")
    for column, (name, points) in enumerate(series.items()):
        top, bottom = grid[0][column], grid[1][column]
        judged = [p[0] for p in points]
        top.plot(judged, [p[1] for p in points], marker="o", label="answers (champion)")
        top.plot(judged, [p[2] for p in points], marker="s", label="shadow")
        top.set_title(name)
        top.set_ylabel("accuracy on judged live items\n(disagreements first)")
        top.set_ylim(0, 1.02)
        top.grid(True, alpha=0.3)
        top.legend()
        bottom.semilogy(judged, [max(p[3], 1e-12) for p in points], marker="o", color="black")
        bottom.axhline(alpha, color="grey", linestyle="--", linewidth=1, label=f"p = {alpha}")
        if min_judged is not None:
            bottom.axvline(min_judged, color="grey", linestyle=":", linewidth=1, label=f"{min_judged} judged")
        bottom.set_xlabel("judged items")
        bottom.set_ylabel("McNemar's exact p")
        bottom.grid(True, alpha=0.3)
        bottom.legend()
    figure.tight_layout()
    return figure


@dataclass(frozen=True)
class HealthPoint:
    """One health window of one version, for `health_over_time`."""

    start: Any  # a datetime
    count: int
    psi: Mapping[str, float]  # by kind
    alarms: Sequence[str]
    estimated: tuple[float, float, float] | None  # value, low, high
    judged: tuple[float, float, float] | None


def health_over_time(series: Mapping[str, Sequence[HealthPoint]], *, title: str) -> Figure:
    """A model's health windows, one line per version: predictions per window; drift (PSI by kind,
    alarms marked); estimated accuracy with its interval beside the judged one."""
    figure = Figure(figsize=(11, 8))
    volume, drift, accuracy = figure.subplots(3, 1, sharex=True)
    for version, points in series.items():
        times = [p.start for p in points]
        volume.plot(times, [p.count for p in points], marker=".", label=version)
        for kind, style in (("labels", "-"), ("confidence", "--"), ("inputs", ":")):
            values = [p.psi.get(kind, np.nan) for p in points]
            drift.plot(times, values, style, label=f"{version} {kind}")
            alarmed = [(t, v) for t, v, p in zip(times, values, points, strict=True) if kind in p.alarms]
            if alarmed:
                drift.scatter([a[0] for a in alarmed], [a[1] for a in alarmed], color="red", zorder=3)
        estimated = [(p.start, p.estimated) for p in points if p.estimated is not None]
        if estimated:
            accuracy.plot([e[0] for e in estimated], [e[1][0] for e in estimated], label=f"{version} estimated")
            accuracy.fill_between(
                [e[0] for e in estimated], [e[1][1] for e in estimated], [e[1][2] for e in estimated], alpha=0.2
            )
        judged = [(p.start, p.judged) for p in points if p.judged is not None]
        if judged:
            low = [j[1][0] - j[1][1] for j in judged]
            high = [j[1][2] - j[1][0] for j in judged]
            accuracy.errorbar(
                [j[0] for j in judged], [j[1][0] for j in judged], yerr=[low, high], fmt="o", label=f"{version} judged"
            )
    volume.set_title(title)
    volume.set_ylabel("predictions")
    drift.set_ylabel("PSI against the reference\n(red: the test alarmed)")
    accuracy.set_ylabel("accuracy (95% intervals)")
    for axes in (volume, drift, accuracy):
        axes.grid(True, alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize="small")
    figure.autofmt_xdate()
    figure.tight_layout()
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    """Write `figure` as a PNG at `path`, creating its folder; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path
