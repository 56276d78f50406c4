"""What a served model accepts and returns, and the pure pre- and post-processing around it.

The signature travels with the model in the store, so the service validates requests against
the model it actually serves rather than against constants compiled into the server.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


class InputError(ValueError):
    """A request's samples do not fit the model's signature; the message says how."""


@dataclass(frozen=True)
class Signature:
    """Per-sample input shape, value range and dtype, and the class names of the output."""

    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    dtype: str = "float32"
    min_value: float = 0.0
    max_value: float = 1.0
    input_name: str = "input"
    output_name: str = "logits"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Signature:
        return cls(
            input_shape=tuple(int(d) for d in raw["input_shape"]),
            class_names=tuple(str(c) for c in raw["class_names"]),
            dtype=str(raw.get("dtype", "float32")),
            min_value=float(raw.get("min_value", 0.0)),
            max_value=float(raw.get("max_value", 1.0)),
            input_name=str(raw.get("input_name", "input")),
            output_name=str(raw.get("output_name", "logits")),
        )


def to_batch(samples: Sequence[Any], signature: Signature, *, max_samples: int) -> NDArray[Any]:
    """Turn decoded JSON samples into one contiguous batch, or raise `InputError` saying why.

    Checks, in order: count, numeric type, shape, finiteness, range. Values are checked as sent,
    before the cast to the model's dtype, so rounding can neither let a value in nor push one out.
    """
    if len(samples) == 0:
        raise InputError("samples is empty: send at least one sample")
    if len(samples) > max_samples:
        raise InputError(f"too many samples: {len(samples)} > the limit of {max_samples} per request")
    try:
        # No dtype here: numpy must tell us what the client sent before anything is converted,
        # otherwise strings such as "3" would be parsed silently.
        raw = np.asarray(samples)
    except ValueError:
        raise InputError(_ragged_message(samples, signature.input_shape)) from None
    if raw.dtype.kind == "O":
        raw = _big_integers(raw)
    if raw.dtype.kind not in "iuf":
        raise InputError(
            "samples must contain only numbers"
            + (" (found text)" if raw.dtype.kind in "US" else "")
            + (" (found true/false)" if raw.dtype.kind == "b" else "")
            + (" (found null or nested objects)" if raw.dtype.kind == "O" else "")
        )
    expected = signature.input_shape
    if raw.shape[1:] != expected:
        raise InputError(
            f"each sample must have shape {list(expected)}, got {list(raw.shape[1:])}"
            f" (samples has shape {list(raw.shape)})"
        )
    if isinstance(samples, list):
        # numpy turns true/false among numbers into 1/0 without a word.
        index = _first_with_bool(samples, raw.ndim)
        if index is not None:
            raise InputError(f"samples[{index}] contains true/false: samples must contain only numbers")
    if raw.dtype.kind == "f":
        finite = np.isfinite(raw)
        if not finite.all():
            index = int(np.argwhere(~finite.reshape(len(raw), -1).all(axis=1))[0][0])
            raise InputError(f"samples[{index}] contains a non-finite value (NaN or infinity)")
    low, high = signature.min_value, signature.max_value
    out_of_range = (raw < low) | (raw > high)
    if out_of_range.any():
        index = int(np.argwhere(out_of_range.reshape(len(raw), -1).any(axis=1))[0][0])
        bad = raw[index][out_of_range[index]][0]
        raise InputError(f"samples[{index}] has value {bad:.10g} outside the range [{low:g}, {high:g}]")
    return np.ascontiguousarray(raw.astype(signature.dtype, copy=False))


def _big_integers(raw: NDArray[Any]) -> NDArray[Any]:
    """Integers beyond 64 bits make an object array: as floats they reach the range check."""
    leaves = raw.ravel().tolist()
    if not leaves or not all(type(v) is int for v in leaves):
        return raw
    try:
        return raw.astype(np.float64)
    except OverflowError:
        raise InputError("samples contain an integer too large for any number type") from None


def _first_with_bool(samples: list[Any], depth: int) -> int | None:
    """Index of the first sample holding a JSON true or false, if any."""
    if bool not in set(map(type, _leaves(samples, depth))):
        return None
    return next(i for i, sample in enumerate(samples) if bool in set(map(type, _leaves([sample], depth))))


def _leaves(nested: list[Any], depth: int) -> Iterable[Any]:
    level: Iterable[Any] = nested
    for _ in range(depth - 1):
        level = itertools.chain.from_iterable(level)
    return level


def _ragged_message(samples: Sequence[Any], expected: tuple[int, ...]) -> str:
    for index, sample in enumerate(samples):
        try:
            shape = np.asarray(sample).shape
        except ValueError:
            return f"samples[{index}] is ragged: its rows have different lengths; expected shape {list(expected)}"
        if shape != expected:
            return f"samples[{index}] has shape {list(shape)}; each sample must have shape {list(expected)}"
    return f"samples have inconsistent shapes; each sample must have shape {list(expected)}"


@dataclass(frozen=True)
class Outputs:
    """Per-sample results of one batch."""

    labels: NDArray[np.int64]
    confidences: NDArray[np.float32]
    probabilities: NDArray[np.float32]


def softmax(logits: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: NDArray[np.float32] = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probabilities


def to_probabilities(scores: NDArray[np.floating[Any]], kind: str = "logits") -> NDArray[np.float32]:
    """A graph's output (N, C) as class probabilities, by what it holds (the spec's `output_kind`):
    softmax of logits, probabilities as they are, exp of log probabilities."""
    if kind == "logits":
        return softmax(scores)
    if kind == "probabilities":
        return np.asarray(scores, dtype=np.float32)
    if kind == "log_probabilities":
        probabilities: NDArray[np.float32] = np.exp(scores).astype(np.float32)
        return probabilities
    raise ValueError(f"unknown output kind {kind!r}")


def postprocess(scores: NDArray[np.floating[Any]], kind: str = "logits") -> Outputs:
    """A graph's output (N, C) to labels, confidences and class probabilities."""
    probabilities = to_probabilities(scores, kind)
    labels = probabilities.argmax(axis=-1).astype(np.int64)
    confidences = probabilities[np.arange(len(labels)), labels]
    return Outputs(labels=labels, confidences=confidences, probabilities=probabilities)
