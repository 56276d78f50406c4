"""Import a team's ONNX classifier: check the graph against its spec, run it once, store it.

A mismatch is refused with an `ImportRefused` naming the spec field and both values, so the
fix is obvious: the spec or the export is wrong, and the message says which part disagrees.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from models import store
from models.provenance import code_version
from models.runtime import DevicePreference, OnnxModel
from models.spec import ModelSpec, OutputKind

logger = logging.getLogger(__name__)

_FLOAT = onnx.TensorProto.FLOAT
PROBABILITY_TOLERANCE = 1e-3  # float32 rows of a Softmax sum to 1 within about 1e-6


class ImportRefused(ValueError):
    """The ONNX file does not fit its spec (or is no ONNX file); the message says where."""


@dataclass(frozen=True)
class Axis:
    """One dimension of a graph input or output: a fixed size, or a symbolic (dynamic) one."""

    size: int | None
    name: str

    def __str__(self) -> str:
        return str(self.size) if self.size is not None else (self.name or "?")


def _axes(value: onnx.ValueInfoProto) -> list[Axis] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    return [
        Axis(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None, d.dim_param)
        for d in value.type.tensor_type.shape.dim
    ]


def check_graph(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Refuse a graph whose input or output disagrees with `spec`."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    names = [i.name for i in inputs]
    if spec.onnx_input not in names:
        raise ImportRefused(f"onnx_input: the spec says {spec.onnx_input!r}, the graph's inputs are {names}")
    if len(inputs) != 1:
        raise ImportRefused(f"the graph has {len(inputs)} inputs ({names}); a classifier here takes one")
    outputs = [o.name for o in graph.output]
    if spec.onnx_output not in outputs:
        raise ImportRefused(f"onnx_output: the spec says {spec.onnx_output!r}, the graph's outputs are {outputs}")
    sample = spec.signature().input_shape
    (given,) = inputs
    if given.type.tensor_type.elem_type != _FLOAT:
        found = onnx.TensorProto.DataType.Name(given.type.tensor_type.elem_type)
        raise ImportRefused(f"input dtype: the spec's input is float32, the graph's {given.name!r} is {found}")
    axes = _axes(given)
    if axes is not None:
        if len(axes) != 1 + len(sample):
            raise ImportRefused(
                f"input rank: the spec says {1 + len(sample)} (a batch of {list(sample)}), "
                f"the graph's {given.name!r} has {len(axes)} ({[str(a) for a in axes]})"
            )
        if axes[0].size is not None:
            raise ImportRefused(
                f"batch axis: the graph's {given.name!r} has a fixed batch of {axes[0].size}; "
                "export it with a dynamic first axis (e.g. dynamic_axes / dynamic_shapes in torch.onnx.export)"
            )
        fixed = [(i, a.size) for i, a in enumerate(axes[1:]) if a.size is not None]
        if any(size != sample[i] for i, size in fixed):
            raise ImportRefused(
                f"input shape: the spec's input makes samples of {list(sample)}, "
                f"the graph's {given.name!r} takes {[str(a) for a in axes[1:]]}"
            )
    output = next(o for o in graph.output if o.name == spec.onnx_output)
    out_axes = _axes(output)
    if out_axes is not None:
        if len(out_axes) != 2:
            raise ImportRefused(
                f"output rank: a classifier answers (batch, classes), the graph's {output.name!r} "
                f"has {len(out_axes)} axes ({[str(a) for a in out_axes]})"
            )
        if out_axes[1].size is not None and out_axes[1].size != len(spec.classes):
            raise ImportRefused(
                f"classes: the spec names {len(spec.classes)}, the graph's {output.name!r} "
                f"answers {out_axes[1].size} scores"
            )


def _sums_to_one(rows: NDArray[np.float64]) -> bool:
    sums = rows.sum(axis=1)
    return bool(np.all(rows >= -PROBABILITY_TOLERANCE) and np.allclose(sums, 1.0, atol=PROBABILITY_TOLERANCE))


def found_output_kind(scores: NDArray[np.floating[Any]]) -> OutputKind:
    """What a probe batch's output rows look like: probabilities (non-negative, each row summing
    to 1), log probabilities (their exponentials do) or logits (anything else)."""
    rows = np.asarray(scores, dtype=np.float64)
    if _sums_to_one(rows):
        return "probabilities"
    if np.all(rows <= PROBABILITY_TOLERANCE) and _sums_to_one(np.exp(rows)):
        return "log_probabilities"
    return "logits"


def check_output_kind(scores: NDArray[np.floating[Any]], spec: ModelSpec) -> None:
    """Refuse a declared `output_kind` the probe batch contradicts: probabilities declared as logits
    would be softmaxed twice, logits declared as probabilities would not be scores at all."""
    found = found_output_kind(scores)
    if found != spec.output_kind:
        rows = "; ".join(f"[{', '.join(f'{v:.4g}' for v in row[:4])}{', …' if len(row) > 4 else ''}]" for row in scores)
        looks = {
            "probabilities": "non-negative and each sums to 1",
            "log_probabilities": "non-positive and their exponentials each sum to 1",
            "logits": "neither probabilities nor log probabilities",
        }[found]
        raise ImportRefused(
            f"output_kind: the spec says {spec.output_kind}, but the graph's {spec.onnx_output!r} rows on a probe "
            f"batch are {looks} ({rows}): write `output_kind: {found}`"
        )


def import_model(
    name: str, onnx_path: Path, spec: ModelSpec, *, device: DevicePreference = DevicePreference.CPU
) -> store.StoredModel:
    """Check `onnx_path` against `spec`, run it once on ONNX Runtime, and save it to the store."""
    try:
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise ImportRefused(f"no such file: {onnx_path}") from None
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ImportRefused(f"{onnx_path} is not a valid ONNX model: {exc}") from None
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file at all
        raise ImportRefused(f"{onnx_path} is not an ONNX model: {type(exc).__name__}: {exc}") from None
    check_graph(model, spec)
    signature = spec.signature()
    runtime = OnnxModel(onnx_path, device=device)
    batch = (
        np.random.default_rng(0)
        .uniform(signature.min_value, signature.max_value, size=(2, *signature.input_shape))
        .astype(np.float32)
    )
    try:
        scores = runtime.run(batch)
    except Exception as exc:  # ONNX Runtime raises its own types for graphs that do not run
        raise ImportRefused(
            f"the graph does not run on a batch of 2 samples of {list(signature.input_shape)}: {exc}"
        ) from None
    if scores.shape != (2, len(spec.classes)):
        raise ImportRefused(
            f"classes: the spec names {len(spec.classes)}, but a batch of 2 gave scores of shape {list(scores.shape)}"
        )
    if not np.isfinite(scores).all():
        raise ImportRefused("the graph's scores are not finite on inputs within the spec's range")
    check_output_kind(scores, spec)
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    card = store.ModelCard(
        signature=signature,
        metrics={},
        dataset_id="none: imported",
        validation_id="none",
        opset=opsets[0] if opsets else 0,
        code_version=code_version(),
        parity_max_abs_diff=0.0,  # nothing to compare with: the file is the model
        extra={"imported_from": onnx_path.name, "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()},
        spec=spec,
    )
    try:
        return store.save(name, onnx_path, card)
    except Exception as exc:  # BentoML refuses names that are not tags
        raise ImportRefused(f"cannot store the model as {name!r}: {exc}") from None
