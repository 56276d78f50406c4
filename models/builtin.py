"""The models that ship with the project, as the layers above know them: by role, never by name.

Serving, review, datasets and the API docs need a default model, an example input, the spec a
model is trained by, the original data a built-in model comes with and the demo data sets; they
take all of it from here, so only `models/` says which models those are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models import digits, shapes, store
from models.signature import Signature
from models.spec import ModelSpec

DEFAULT_MODEL_NAME = digits.DEFAULT_MODEL_NAME

_SPECS: dict[str, Callable[[], ModelSpec]] = {
    digits.DEFAULT_MODEL_NAME: digits.digits_spec,
    shapes.MODEL_NAME: shapes.spec,
}


@dataclass(frozen=True)
class DemoData:
    """A synthetic data set `loop demo-data NAME DIR` writes, and the built-in model it is for."""

    model_name: str
    write: Callable[..., int]  # (folder, *, per_class, seed, progress) -> images written
    default_per_class: int
    description: str


DEMO_DATA: dict[str, DemoData] = {
    "shapes": DemoData(
        model_name=shapes.MODEL_NAME,
        write=shapes.write,
        default_per_class=shapes.DEFAULT_PER_CLASS,
        description=f"64x64 RGB PNGs of {', '.join(shapes.CLASS_NAMES)}, one folder per class",
    ),
}


def example_input() -> list[Any]:
    """One sample of the built-in model as a client sends it (for the API's examples)."""
    return [[float(v) for v in row] for row in digits.FIRST_DIGIT]


def signature() -> Signature:
    return digits.digits_signature()


def builtin_spec(name: str) -> ModelSpec | None:
    """The spec of a built-in model of that name, if there is one."""
    make = _SPECS.get(name)
    return None if make is None else make()


def spec_of(name: str) -> ModelSpec:
    """The spec a model is compiled and retrained by: the newest stored version's when it names a
    trainer, else the built-in model's of that name, else the stored one (which names no trainer).

    Raises `store.ModelNotFound` for a name that is neither stored nor built in."""
    stored = store.get(f"{name}:latest") if store.exists(f"{name}:latest") else None
    if stored is not None and stored.card.model_spec.trainer is not None:
        return stored.card.model_spec
    builtin = builtin_spec(name)
    if builtin is not None:
        return builtin
    if stored is not None:
        return stored.card.model_spec
    raise store.ModelNotFound(f"no model {name!r} in the store and no built-in one (import it: `loop models import`)")


@dataclass(frozen=True)
class Bundled:
    """Original data that ships with a built-in model, split once into training and validation rows."""

    name: str
    split_id: str
    seed: int
    train_ids: tuple[str, ...]
    train_inputs: NDArray[np.float32]
    train_labels: tuple[str, ...]
    validation_ids: tuple[str, ...]
    validation_inputs: NDArray[np.float32]
    validation_labels: tuple[str, ...]


def has_bundled_originals(name: str) -> bool:
    """Whether model `name` ships with its original data."""
    return name == digits.DEFAULT_MODEL_NAME


def bundled_originals(
    name: str, split_path: Path, *, seed: int = 0, train: Sequence[int] | None = None
) -> Bundled | None:
    """The original data bundled with model `name` (None when it has none) with its frozen split at
    `split_path` (created once); `train` narrows the training side to those rows."""
    if not has_bundled_originals(name):
        return None
    data = digits.load()
    split = digits.load_or_create_split(split_path, data, seed=seed)
    train_idx = np.asarray(split.train_indices if train is None else train)
    val_idx = np.asarray(split.validation_indices)
    if not set(train_idx.tolist()) <= set(split.train_indices):
        raise ValueError("the training rows must come from the split's training side")
    names = digits.CLASS_NAMES
    return Bundled(
        name="digits",
        split_id=split.split_id,
        seed=split.seed,
        train_ids=tuple(f"digits:{i:05d}" for i in train_idx),
        train_inputs=data.images[train_idx],
        train_labels=tuple(names[i] for i in data.labels[train_idx]),
        validation_ids=tuple(f"digits:{i:05d}" for i in val_idx),
        validation_inputs=data.images[val_idx],
        validation_labels=tuple(names[i] for i in data.labels[val_idx]),
    )


# The loop demo's task: the default model's bundled data, a skewed first training subset.
DEMO_INITIAL_PER_CLASS = digits.DEMO_INITIAL_PER_CLASS


@dataclass(frozen=True)
class DemoTask:
    """The built-in task `loop demo-loop` runs on: a model, all of its bundled data, a frozen split."""

    model_name: str
    spec: ModelSpec
    inputs: NDArray[np.float32]  # every sample, as a client sends it
    labels: NDArray[np.int64]  # class indices into spec.classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.classes

    def split(self, path: Path, *, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(training rows, validation rows), frozen at `path` the first time."""
        split = digits.load_or_create_split(path, digits.Digits(self.inputs, self.labels), seed=seed)
        return split.train_indices, split.validation_indices

    def initial(self, train_rows: Sequence[int], per_class: Sequence[int], *, seed: int) -> list[int]:
        """The first model's training rows: `per_class[c]` of class c, drawn with `seed`."""
        return digits.skewed_subset(self.labels, train_rows, per_class, seed=seed)

    def drifted(self, rows: Sequence[int] | NDArray[np.intp], *, seed: int) -> NDArray[np.float32]:
        """The samples of `rows` as traffic that moved away from the bundled data (which has every
        digit centred): see `moved`."""
        return moved(self.inputs[np.asarray(rows, dtype=np.intp)], np.random.default_rng(seed))


def moved(images: NDArray[np.float32], rng: np.random.Generator, reach: int = 2) -> NDArray[np.float32]:
    """Each image moved by (dx, dy) drawn with `rng`, at most `reach` pixels along either axis and
    at least two in all (|dx| + |dy| >= 2); what is uncovered is blank (0), what leaves is lost."""
    out = np.zeros_like(images)
    height, width = images.shape[-2:]
    for i, image in enumerate(images):
        dx, dy = 0, 0
        while abs(dx) + abs(dy) < 2:
            dx, dy = (int(d) for d in rng.integers(-reach, reach + 1, size=2))
        out[i, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
            max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
        ]
    return out


def demo_task() -> DemoTask:
    data = digits.load()
    return DemoTask(model_name=DEFAULT_MODEL_NAME, spec=digits.digits_spec(), inputs=data.images, labels=data.labels)
