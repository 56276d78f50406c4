"""What a data set holds, in memory: a model's classes and input kind (`LabelSchema`), labelled
rows whose inputs are tensors or image files as sent (`Rows`), and a model's original data split
once into training and validation rows (`Originals`). No SQL and no files here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.signature import Signature
from models.spec import ImageInput, ModelSpec

Progress = Callable[[int, int], None]  # (rows done, rows expected)


@dataclass(frozen=True)
class Blob:
    """An image input as sent: its encoded bytes and media type."""

    data: bytes
    media_type: str


Input = NDArray[np.float32] | Blob  # a tensor model's sample, or an image model's file


@dataclass(frozen=True)
class LabelSchema:
    """The classes of a model and what its inputs are: tensors of `input_shape`, or images as sent
    (`image`, which also says how to turn them into tensors of `input_shape`)."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    dtype: str = "float32"
    image: ImageInput | None = None

    @classmethod
    def of(cls, model: ModelSpec | Signature) -> LabelSchema:
        """The labels and input a model's spec (or, for a tensor model, its signature) declares."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec.of_signature(model)
        signature = spec.signature()
        image = spec.input if isinstance(spec.input, ImageInput) else None
        return cls(class_names=spec.classes, input_shape=signature.input_shape, dtype=signature.dtype, image=image)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LabelSchema:
        image = raw.get("image")
        return cls(
            class_names=tuple(raw["class_names"]),
            input_shape=tuple(raw["input_shape"]),
            dtype=raw.get("dtype", "float32"),
            image=None if image is None else ImageInput.model_validate(image),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "dtype": self.dtype,
        }
        if self.image is not None:
            out["image"] = self.image.model_dump(mode="json")
        return out


@dataclass(frozen=True)
class Rows:
    """Labelled rows in memory: ids, class names, and inputs (tensors, or image files as sent)."""

    ids: tuple[str, ...]
    labels: tuple[str, ...]
    inputs: Sequence[Input]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Originals:
    """The data a model was first trained on, split once into training and validation rows.

    `validation` is None when the split's validation side is frozen as a version already (an
    imported data set): only the training side is needed to compile."""

    name: str
    split_id: str
    seed: int
    train: Rows
    validation: Rows | None


def input_key(value: Input) -> bytes:
    """Identity of an input's content: the same pixels (or image bytes) give the same key whatever their source."""
    data = value.data if isinstance(value, Blob) else np.ascontiguousarray(value, dtype=np.float32).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()
