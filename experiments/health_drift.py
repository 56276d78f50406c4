"""How fast live model health flags drift, how often it cries wolf, how close its accuracy estimate is.

    python -m experiments.health_drift [--model digits-cnn:latest] [--trials 50] [--out docs/health-drift.png]

The digits model's reference is its run over its frozen validation digits (`models.health.Reference`,
as the health job makes it). Undrifted traffic is drawn from those digits (with replacement: the
distribution the reference stands for); drifted traffic from the same draw, then shifted (+2 on
every pixel, of 0..16), noised (Gaussian, sigma 3, clipped to 0..16), or with one class taking half
of the traffic. For each window size n, `--trials` windows of each kind are compared with the
reference at level alpha, as `feedback.health.report` compares them; the table says how often each
was flagged, the smallest n flagged in at least 90% of windows, and the estimated against the true
accuracy (the true labels are known here). Prints the table in Markdown and writes the plot.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray

from models import digits, health, store
from models.plots import save_png
from models.runtime import DevicePreference, OnnxModel
from models.signature import to_probabilities

logger = logging.getLogger("health_drift")

SIZES = (25, 50, 100, 200, 400, 800)
Drift = Callable[
    [NDArray[np.float32], NDArray[np.int64], np.random.Generator], tuple[NDArray[np.float32], NDArray[np.int64]]
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-cnn:latest")
    parser.add_argument("--split", type=Path, default=Path("var/validation/digits-cnn-split.json"))
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("docs/health-drift.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stored = store.get(args.model)
    session = OnnxModel(stored.onnx_path, device=DevicePreference.CPU)
    data = digits.load()
    validation = np.array(json.loads(args.split.read_text())["validation_indices"])
    images, labels = data.images[validation].astype(np.float32), data.labels[validation].astype(np.int64)

    def answer(x: NDArray[np.float32]) -> NDArray[np.float32]:
        return to_probabilities(session.run(x), stored.card.model_spec.output_kind)

    names = health.feature_names(stored.card.model_spec.input)
    reference = health.Reference.of(answer(images), labels, health.tensor_features(images), names)
    drifts: dict[str, tuple[str, Drift]] = {
        "none": ("", lambda x, y, rng: (x, y)),
        "shifted +2": ("inputs", lambda x, y, rng: (np.clip(x + 2, 0, 16), y)),
        "noised, sigma 3": (
            "inputs",
            lambda x, y, rng: (np.clip(x + rng.normal(0, 3, x.shape), 0, 16).astype(np.float32), y),
        ),
        "class 3 at 50%": ("labels", _one_class_half(images, labels, 3)),
    }
    rng = np.random.default_rng(0)
    flagged: dict[str, list[float]] = {}
    sizes = " | ".join(f"n={n}" for n in SIZES)
    print(f"| drift | expected alarm | {sizes} | n flagged in 90% | estimated / true accuracy at n=400 |")
    print(f"|---|---|{'---|' * len(SIZES)}---|---|")
    for label, (kind, drift) in drifts.items():
        rates, accuracy = [], (0.0, 0.0)
        for n in SIZES:
            alarms, estimated, true = 0, [], []
            for _ in range(args.trials):
                picked = rng.choice(len(labels), n)
                x, y = drift(images[picked], labels[picked], rng)
                p = answer(x)
                sketch = reference.sketch(p.argmax(axis=1), p.max(axis=1), health.tensor_features(x))
                shifts = health.shifts(reference, sketch, alpha=args.alpha)
                alarms += any(s.alarm for s in shifts) if not kind else any(s.alarm for s in shifts if s.kind == kind)
                found = health.estimated_accuracy(reference, sketch)
                assert found is not None
                estimated.append(found.value)
                true.append(float((p.argmax(axis=1) == y).mean()))
            rates.append(alarms / args.trials)
            if n == 400:
                accuracy = (float(np.mean(estimated)), float(np.mean(true)))
        flagged[label] = rates
        first = next((str(n) for n, r in zip(SIZES, rates, strict=True) if r >= 0.9), "not within 800") if kind else "-"
        cells = " | ".join(f"{r:.0%}" for r in rates)
        expected = kind or "none (false alarms, any kind)"
        print(f"| {label} | {expected} | {cells} | {first} | {accuracy[0]:.3f} / {accuracy[1]:.3f} |")
    print(f"\nlevel {args.alpha}, {args.trials} windows per cell; reference: {reference.samples} validation digits, "
          f"accuracy {reference.accuracy:.3f}")  # fmt: skip
    save_png(_figure(flagged, args.alpha), args.out)
    print(f"plot: {args.out}")


def _one_class_half(images: NDArray[np.float32], labels: NDArray[np.int64], digit: int) -> Drift:
    ones = np.flatnonzero(labels == digit)

    def drift(
        x: NDArray[np.float32], y: NDArray[np.int64], rng: np.random.Generator
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        half = len(x) // 2
        picked = rng.choice(ones, half)
        return np.concatenate([images[picked], x[half:]]), np.concatenate([labels[picked], y[half:]])

    return drift


def _figure(flagged: dict[str, list[float]], alpha: float) -> Figure:
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for label, rates in flagged.items():
        axes.plot(SIZES, rates, marker="o", label=label if label != "none" else "no drift (false alarms)")
    axes.axhline(alpha * 3, color="grey", linestyle=":", label=f"3 kinds at level {alpha}")
    axes.set_xscale("log")
    axes.set_xticks(SIZES, [str(n) for n in SIZES])
    axes.minorticks_off()
    axes.set_xlabel("predictions in the window")
    axes.set_ylabel("windows flagged")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
