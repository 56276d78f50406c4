"""The default task: scikit-learn's bundled 8x8 digits, with a frozen validation split."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.signature import Signature
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "digits-cnn"
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
INPUT_SHAPE: tuple[int, int] = (8, 8)
PIXEL_MAX = 16.0  # the digits' pixels are integer ink counts in 0..16


@dataclass(frozen=True)
class Digits:
    """The whole bundled data set: images (N, 8, 8) float32 in [0, 16] and labels (N,)."""

    images: NDArray[np.float32]
    labels: NDArray[np.int64]

    @property
    def dataset_id(self) -> str:
        """Content hash of images and labels: changes if and only if the data does."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return "digits-" + digest.hexdigest()[:16]


# The first of the digits (a zero), as a client sends it: the API's example, without loading the data set.
FIRST_DIGIT: list[list[float]] = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
]


def load() -> Digits:
    """Load the digits that ship with scikit-learn (no download)."""
    from sklearn.datasets import load_digits  # a second's import: every command and worker reads this module

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return Digits(images=images, labels=labels)


@dataclass(frozen=True)
class Split:
    """A frozen train/validation split by row index into `Digits`."""

    split_id: str
    dataset_id: str
    seed: int
    train_indices: tuple[int, ...]
    validation_indices: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "split_id": self.split_id,
                "dataset_id": self.dataset_id,
                "seed": self.seed,
                "train_indices": list(self.train_indices),
                "validation_indices": list(self.validation_indices),
            },
            indent=None,
        )

    @classmethod
    def from_json(cls, text: str) -> Split:
        raw = json.loads(text)
        return cls(
            split_id=raw["split_id"],
            dataset_id=raw["dataset_id"],
            seed=int(raw["seed"]),
            train_indices=tuple(int(i) for i in raw["train_indices"]),
            validation_indices=tuple(int(i) for i in raw["validation_indices"]),
        )


def make_split(data: Digits, *, seed: int, validation_fraction: float = 0.2) -> Split:
    """Draw a stratified, seeded validation split."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(data.labels))
    train, validation = train_test_split(
        indices,
        test_size=validation_fraction,
        random_state=seed,
        stratify=data.labels,
    )
    train_t = tuple(sorted(int(i) for i in train))
    validation_t = tuple(sorted(int(i) for i in validation))
    digest = hashlib.sha256(f"{data.dataset_id}:{validation_t}".encode()).hexdigest()[:12]
    return Split(
        split_id=f"val-{digest}",
        dataset_id=data.dataset_id,
        seed=seed,
        train_indices=train_t,
        validation_indices=validation_t,
    )


def load_or_create_split(path: Path, data: Digits, *, seed: int) -> Split:
    """Return the split frozen at `path`, creating it once if the file does not exist.

    A frozen split is never redrawn: if the data no longer matches it, that is an error,
    because models evaluated on different validation sets cannot be compared.
    """
    if path.exists():
        split = Split.from_json(path.read_text())
        if split.dataset_id != data.dataset_id:
            raise ValueError(
                f"validation split {path} was frozen for dataset {split.dataset_id}, "
                f"but the data is {data.dataset_id}; create a new validation version explicitly"
            )
        logger.info("using frozen validation split %s from %s", split.split_id, path)
        return split
    split = make_split(data, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(split.to_json())
    tmp.replace(path)
    logger.info(
        "froze validation split %s (%d validation, %d train) at %s",
        split.split_id,
        len(split.validation_indices),
        len(split.train_indices),
        path,
    )
    return split


def digits_signature() -> Signature:
    return Signature(
        input_shape=INPUT_SHAPE,
        class_names=CLASS_NAMES,
        dtype="float32",
        min_value=0.0,
        max_value=PIXEL_MAX,
    )


# The demo's first model: a few samples of most classes, fewer of some, none of the last, so that
# it starts well below what the whole training side reaches and review has something to fix.
DEMO_INITIAL_PER_CLASS: tuple[int, ...] = (8, 8, 6, 6, 5, 5, 4, 3, 2, 0)


def skewed_subset(
    labels: NDArray[np.int64], indices: Sequence[int], per_class: Sequence[int], *, seed: int
) -> list[int]:
    """A seeded draw of `per_class[c]` of `indices` of each class c (sorted); raises if a class has too few."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(indices)
    chosen: list[int] = []
    for label, wanted in enumerate(per_class):
        of_class = pool[labels[pool] == label]
        if wanted > len(of_class):
            raise ValueError(f"class {label} has {len(of_class)} rows, fewer than the {wanted} asked for")
        chosen.extend(int(i) for i in rng.permutation(of_class)[:wanted])
    return sorted(chosen)


TRAINER = "models.trainers:digits_cnn"


def digits_spec() -> ModelSpec:
    """The default model's spec: raw 8x8 pixels in [0, 16], ten digits, trained by `digits_cnn`."""
    return ModelSpec.of_signature(digits_signature()).model_copy(update={"trainer": TRAINER})
