"""ONNX export with a dynamic batch axis, and the parity check against PyTorch."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from models.train import predict_logits

logger = logging.getLogger(__name__)

OPSET = 20
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The exported graph disagrees with the PyTorch model beyond the tolerance."""


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    sample_shape: Sequence[int],
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = OPSET,
) -> Path:
    """Export `model` (in eval mode) to a single self-contained ONNX file with a dynamic batch axis."""
    model.eval()
    example = torch.zeros((2, *sample_shape), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter, not actionable here
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(str(path))
    logger.info("exported ONNX opset %d to %s (%d bytes)", opset, path, path.stat().st_size)
    return path


def opset_of(path: Path) -> int:
    """The default-domain opset a graph was written for."""
    model = onnx.load(str(path), load_external_data=False)
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return opsets[0] if opsets else 0


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    inputs: Sequence[NDArray[np.float32]],
    *,
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Run every input batch through PyTorch and ONNX Runtime (CPU); return the max abs difference.

    Raises `ParityError` when it exceeds `tolerance`.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    worst = 0.0
    for batch in inputs:
        expected = predict_logits(model, batch)
        actual: Any = session.run(None, {input_name: batch})[0]
        worst = max(worst, float(np.abs(expected - actual).max()))
    if worst > tolerance:
        raise ParityError(f"ONNX output differs from PyTorch by {worst:.3g} > {tolerance:g}")
    logger.info("ONNX parity: max abs difference %.3g over %d batches", worst, len(inputs))
    return worst
