"""Is the model still right? The statistics of live model health, on counts that add up.

A window of predictions is summarised as a `Sketch`: how many, the predicted labels' counts, a
histogram of confidence (fixed bins on [0, 1]) and one histogram per input feature, binned on the
edges of the version's `Reference`. Sketches of consecutive windows add (an hour's plus the next
hour's is the two hours'), so a job folds new predictions into the stored windows once each, and a
day is the sum of its hours.

A `Reference` is the model version run over its frozen validation set: the same histograms, and
per confidence bin how often the version was right there (its calibration). Against it a window is
judged with a two-sample chi-square test of homogeneity per kind (labels, confidence, each input
feature, Bonferroni over the features), whose false alarm rate on undrifted traffic is the test's
level, beside the population stability index (PSI) as the size of the shift. Accuracy where nobody
has judged yet is the window's confidence histogram weighted by the reference's calibration
(confidence-based performance estimation), with an interval.

Input features: a tensor's values when it has at most `MAX_FEATURES`, else the means of
`MAX_FEATURES` equal runs of its values; an image's width, height, mean brightness of each channel
and contrast (the standard deviation of its grey levels), from the image as sent.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from models.npy import read_npy
from models.spec import ImageInput, TensorInput

InputSpec = TensorInput | ImageInput

MAX_FEATURES = 64
CONFIDENCE_BINS = 20
FEATURE_BINS = 10  # quantile bins of each feature on the reference
MIN_EXPECTED = 5  # bins are pooled until the reference has this many in each
PSI_FLOOR = 1e-4  # an empty bin's share, so that the PSI stays finite
IMAGE_FEATURES = ("width", "height", "brightness R", "brightness G", "brightness B", "contrast")


def feature_names(spec: InputSpec) -> list[str]:
    """What each input feature is, for reports."""
    if isinstance(spec, ImageInput):
        return list(IMAGE_FEATURES)
    size = math.prod(int(d) for d in spec.shape)
    if size <= MAX_FEATURES:
        return [str([int(v) for v in np.unravel_index(i, [int(d) for d in spec.shape])]) for i in range(size)]
    edges = np.linspace(0, size, MAX_FEATURES + 1).astype(int)
    return [f"mean of values {a} to {b - 1}" for a, b in itertools.pairwise(edges)]


def tensor_features(batch: NDArray[Any]) -> NDArray[np.float64]:
    """(N, K) features of N tensor samples."""
    flat = batch.reshape(len(batch), -1).astype(np.float64)
    if flat.shape[1] <= MAX_FEATURES:
        return flat
    edges = np.linspace(0, flat.shape[1], MAX_FEATURES + 1).astype(int)
    return np.add.reduceat(flat, edges[:-1], axis=1) / np.diff(edges)


def image_features(data: bytes) -> NDArray[np.float64]:
    """The features of one encoded image (NaN when it does not decode)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    except Exception:  # a stored image always decoded once; a damaged one is only not counted
        return np.full(len(IMAGE_FEATURES), np.nan)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    means = rgb.reshape(-1, 3).mean(axis=0)
    return np.array([rgb.shape[1], rgb.shape[0], *means, grey.std()])


def input_features(spec: InputSpec, inputs: Sequence[bytes]) -> NDArray[np.float64]:
    """(N, K) features of N logged inputs: .npy bytes of tensors, or images as sent."""
    if isinstance(spec, ImageInput):
        return np.array([image_features(data) for data in inputs]).reshape(len(inputs), len(IMAGE_FEATURES))
    if not inputs:
        return np.empty((0, len(feature_names(spec))))
    first = inputs[0]
    header = len(first) - math.prod(int(d) for d in spec.shape) * 4
    if header > 0 and all(len(data) == len(first) and data[:header] == first[:header] for data in inputs):
        values = np.frombuffer(b"".join(data[header:] for data in inputs), dtype="<f4")  # one header: one read
        return tensor_features(values.reshape(len(inputs), -1))
    return tensor_features(np.stack([read_npy(data).reshape(-1) for data in inputs]))


def confidence_bin(confidence: NDArray[Any]) -> NDArray[np.intp]:
    return np.clip((np.asarray(confidence) * CONFIDENCE_BINS).astype(np.intp), 0, CONFIDENCE_BINS - 1)


@dataclass
class Reference:
    """A version on its validation set (or on a window of its predictions a team picked): the
    histograms windows are compared with, and its calibration."""

    samples: int
    labels: NDArray[np.int64]  # predicted labels' counts, by class index
    confidence: NDArray[np.int64]  # by confidence bin
    correct: NDArray[np.int64]  # right answers by confidence bin
    edges: list[NDArray[np.float64]]  # each feature's inner bin edges
    features: list[NDArray[np.int64]]  # each feature's counts over its bins
    names: list[str]
    accuracy: float | None  # None: a window's, whose answers' truth is not known
    # The answers behind `correct`, by confidence bin, when they are not `confidence`'s: a window's
    # reference borrows its calibration from the validation version's.
    judged: NDArray[np.int64] | None = None

    @classmethod
    def of(
        cls, probabilities: NDArray[Any], truth: NDArray[Any], features: NDArray[np.float64], names: list[str]
    ) -> Reference:
        predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
        bins = confidence_bin(confidence)
        edges = [np.unique(np.nanquantile(column, np.linspace(0, 1, FEATURE_BINS + 1)[1:-1])) for column in features.T]
        return cls(
            samples=len(truth),
            labels=np.bincount(predicted, minlength=probabilities.shape[1]),
            confidence=np.bincount(bins, minlength=CONFIDENCE_BINS),
            correct=np.bincount(bins, weights=predicted == truth, minlength=CONFIDENCE_BINS).astype(np.int64),
            edges=edges,
            features=[_histogram(column, e) for column, e in zip(features.T, edges, strict=True)],
            names=names,
            accuracy=float((predicted == truth).mean()),
        )

    @classmethod
    def of_window(
        cls,
        labels: NDArray[np.int64],
        confidence: NDArray[np.int64],
        features: NDArray[np.float64],
        names: list[str],
        *,
        calibrated_by: Reference | None,
    ) -> Reference:
        """The reference of a window of logged predictions a team picked: its predicted labels' and
        confidence bins' counts, its input features (of a sample), calibrated by `calibrated_by` (the
        validation version's reference) when there is one, else by confidence as it is."""
        edges = [np.unique(np.nanquantile(column, np.linspace(0, 1, FEATURE_BINS + 1)[1:-1])) for column in features.T]
        return cls(
            samples=int(labels.sum()),
            labels=labels,
            confidence=confidence,
            correct=calibrated_by.correct if calibrated_by else np.zeros(CONFIDENCE_BINS, dtype=np.int64),
            edges=edges,
            features=[_histogram(column, e) for column, e in zip(features.T, edges, strict=True)],
            names=names,
            accuracy=None,
            judged=calibrated_by.answered() if calibrated_by else np.zeros(CONFIDENCE_BINS, dtype=np.int64),
        )

    def answered(self) -> NDArray[np.int64]:
        """The answers of known truth behind the calibration, by confidence bin."""
        return self.confidence if self.judged is None else self.judged

    def calibration(self) -> NDArray[np.float64]:
        """The chance of a right answer per confidence bin: the validation set's rate there, pulled
        towards the bin's middle by two pseudo-observations (empty bins get the middle)."""
        middle = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS
        return (self.correct + 2 * middle) / (self.answered() + 2)

    def sketch(self, labels: NDArray[Any], confidence: NDArray[Any], features: NDArray[np.float64]) -> Sketch:
        """The sketch of a window's predictions, binned as this reference bins."""
        answers = Sketch.of_answers(labels, confidence, classes=len(self.labels))
        answers.features = [_histogram(column, e) for column, e in zip(features.T, self.edges, strict=True)]
        return answers

    def to_dict(self) -> dict[str, Any]:
        arrays = {"labels": self.labels, "confidence": self.confidence, "correct": self.correct}
        return {
            "samples": self.samples,
            **{name: values.tolist() for name, values in arrays.items()},
            "edges": [e.tolist() for e in self.edges],
            "features": [f.tolist() for f in self.features],
            "names": self.names,
            "accuracy": self.accuracy,
            "judged": None if self.judged is None else self.judged.tolist(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Reference:
        return cls(
            samples=int(raw["samples"]),
            labels=np.array(raw["labels"], dtype=np.int64),
            confidence=np.array(raw["confidence"], dtype=np.int64),
            correct=np.array(raw["correct"], dtype=np.int64),
            edges=[np.array(e, dtype=np.float64) for e in raw["edges"]],
            features=[np.array(f, dtype=np.int64) for f in raw["features"]],
            names=list(raw["names"]),
            accuracy=None if raw["accuracy"] is None else float(raw["accuracy"]),
            judged=None if raw.get("judged") is None else np.array(raw["judged"], dtype=np.int64),
        )


def _histogram(values: NDArray[np.float64], edges: NDArray[np.float64]) -> NDArray[np.int64]:
    known = values[~np.isnan(values)]
    return np.bincount(np.searchsorted(edges, known, side="right"), minlength=len(edges) + 1).astype(np.int64)


@dataclass
class Sketch:
    """A window's predictions as counts (see the module's docstring); sketches add."""

    count: int = 0
    labels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    confidence: NDArray[np.int64] = field(default_factory=lambda: np.zeros(CONFIDENCE_BINS, dtype=np.int64))
    features: list[NDArray[np.int64]] = field(default_factory=list)

    @classmethod
    def of_answers(cls, labels: NDArray[Any], confidence: NDArray[Any], *, classes: int) -> Sketch:
        """The labels and confidence of a window's predictions (no input features)."""
        return cls(
            count=len(labels),
            labels=np.bincount(np.asarray(labels, dtype=np.intp), minlength=classes),
            confidence=np.bincount(confidence_bin(confidence), minlength=CONFIDENCE_BINS),
        )

    def __add__(self, other: Sketch) -> Sketch:
        if not self.count:
            return other
        if not other.count:
            return self
        return Sketch(
            count=self.count + other.count,
            labels=self.labels + other.labels,
            confidence=self.confidence + other.confidence,
            features=[a + b for a, b in zip(self.features, other.features, strict=True)],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "labels": self.labels.tolist(),
            "confidence": self.confidence.tolist(),
            "features": [f.tolist() for f in self.features],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Sketch:
        return cls(
            count=int(raw["count"]),
            labels=np.array(raw["labels"], dtype=np.int64),
            confidence=np.array(raw["confidence"], dtype=np.int64),
            features=[np.array(f, dtype=np.int64) for f in raw["features"]],
        )


@dataclass(frozen=True)
class Shift:
    """One kind's comparison of a window with the reference."""

    kind: str  # labels, confidence, inputs
    psi: float
    p_value: float
    alarm: bool
    worst: str | None = None  # for inputs: the feature that moved most


def _pooled(reference: NDArray[np.int64], window: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Adjacent bins merged until each holds `MIN_EXPECTED` of the reference (the test's condition)."""
    pooled_ref: list[int] = []
    pooled_win: list[int] = []
    ref_run = win_run = 0
    for r, w in zip(reference.tolist(), window.tolist(), strict=True):
        ref_run, win_run = ref_run + r, win_run + w
        if ref_run >= MIN_EXPECTED:
            pooled_ref.append(ref_run)
            pooled_win.append(win_run)
            ref_run = win_run = 0
    if pooled_ref and (ref_run or win_run):  # the remainder joins the last bin
        pooled_ref[-1] += ref_run
        pooled_win[-1] += win_run
    return np.array(pooled_ref, dtype=np.int64), np.array(pooled_win, dtype=np.int64)


def homogeneity(reference: NDArray[np.int64], window: NDArray[np.int64]) -> tuple[float, float]:
    """(PSI, p-value of the chi-square test that both counts come from one distribution)."""
    from scipy.stats import chi2

    ref, win = _pooled(reference, window)
    if len(ref) < 2 or win.sum() == 0:
        return 0.0, 1.0
    p_ref = np.maximum(ref / ref.sum(), PSI_FLOOR)
    p_win = np.maximum(win / win.sum(), PSI_FLOOR)
    psi = float(np.sum((p_win - p_ref) * np.log(p_win / p_ref)))
    table = np.vstack([ref, win]).astype(np.float64)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / np.where(expected > 0, expected, 1)))
    return psi, float(chi2.sf(statistic, len(ref) - 1))


def shifts(reference: Reference, sketch: Sketch, *, alpha: float) -> list[Shift]:
    """Labels, confidence and inputs of a window against the reference, each alarmed at level `alpha`."""
    found = []
    for kind, ref, win in (
        ("labels", reference.labels, sketch.labels),
        ("confidence", reference.confidence, sketch.confidence),
    ):
        psi, p = homogeneity(ref, win)
        found.append(Shift(kind, psi, p, p < alpha))
    tested = [
        (name, *homogeneity(ref, win))
        for name, ref, win in zip(reference.names, reference.features, sketch.features, strict=True)
        if len(ref) > 1
    ]
    if tested:
        worst_name, worst_psi, _ = max(tested, key=lambda t: t[1])
        p_min = min(1.0, min(t[2] for t in tested) * len(tested))  # Bonferroni over the features
        found.append(Shift("inputs", worst_psi, p_min, p_min < alpha, worst_name))
    return found


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


def estimated_accuracy(reference: Reference, sketch: Sketch) -> Estimate | None:
    """The accuracy a window's confidences promise, by the reference's calibration, with a 95% interval
    (the answers' own chance and the calibration's uncertainty). None for an empty window."""
    if not sketch.count:
        return None
    rate = reference.calibration()
    share = sketch.confidence / sketch.count
    value = float(share @ rate)
    variance = float(share @ (rate * (1 - rate))) / sketch.count
    variance += float((share**2) @ (rate * (1 - rate) / (reference.answered() + 2)))
    half = 1.96 * math.sqrt(variance)
    return Estimate(value, max(0.0, value - half), min(1.0, value + half))


def judged_accuracy(correct: int, wrong: int) -> Estimate | None:
    """Reviewers' verdicts' accuracy with a 95% Wilson interval; None when none were judged."""
    n = correct + wrong
    if not n:
        return None
    p, z = correct / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half))


def disagree(estimated: Estimate | None, judged: Estimate | None) -> bool:
    """The estimate and the judged accuracy's intervals do not overlap."""
    return estimated is not None and judged is not None and (judged.high < estimated.low or judged.low > estimated.high)
