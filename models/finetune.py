"""Fine-tune a team's own ONNX graph: the network they imported is improved, not replaced.

The graph is converted to PyTorch with onnx2torch, its weights are trained on the dataset version
with the fixed protocol (at a learning rate scaled for fine-tuning, batch-norm statistics frozen),
and the trained weights are written back into the same graph: the file that is stored has the
imported graph's operators, input, output and output kind, with new values in its weight
tensors. The pipeline then checks that file against the PyTorch module (parity) like any export.

Every float weight tensor of the graph that the converted module holds with the same values is
trained (convolutions, batch-norm scales and shifts, fully connected layers); tensors it cannot
find again (reshaped or transposed by the conversion) and small constants stay as they were.
A graph with an operator the converter does not know is refused before any training, naming it.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from models.train import TrainConfig

logger = logging.getLogger(__name__)

LEARNING_RATE_FACTOR = 0.05  # of the protocol's rate: 2e-3 -> 1e-4, a fine-tuning rate for pretrained weights
MIN_TRAINED_SIZE = 2  # single numbers in a graph are constants (hard-sigmoid slopes, scales), not weights
PROBABILITY_FLOOR = 1e-7  # log(p) of a graph that answers probabilities, kept finite


class Unconvertible(ValueError):
    """The graph cannot be fine-tuned here; the message names the operator or the reason."""


@contextmanager
def _without_torchvision() -> Iterator[None]:
    """onnx2torch imports torchvision for its NMS and RoIAlign converters only; torchvision has no
    build for the CPU torch here. A placeholder stands in while onnx2torch is imported, and is
    removed so that nothing else (torch's ONNX exporter) takes it for the real package."""
    try:
        import torchvision  # type: ignore[import-not-found]  # noqa: F401
    except (ImportError, RuntimeError):
        placeholder, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = None  # type: ignore[attr-defined]
        placeholder.ops = ops  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": placeholder, "torchvision.ops": ops})
        try:
            yield
        finally:
            for name in ("torchvision", "torchvision.ops"):
                if sys.modules.get(name) in (placeholder, ops):
                    del sys.modules[name]
    else:
        yield


def _onnx2torch() -> Any:
    with _without_torchvision():
        import onnx2torch
        from onnx2torch.node_converters import registry
    return onnx2torch, registry


def normalised_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose `Constant` nodes holding tensors are initializers (older exporters,
    Paddle2ONNX among them, keep every weight in a Constant node, where converters look for none)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = []
    for node in out.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            out.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def check_convertible(model: onnx.ModelProto) -> None:
    """Refuse a graph with an operator onnx2torch has no converter for, naming each one."""
    _, registry = _onnx2torch()
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: set[str] = set()
    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            missing.add(f"{domain}.{node.op_type}")
            continue
        try:
            registry.get_converter(node.op_type, opsets.get(domain, opsets.get("", 0)), domain="")
        except NotImplementedError:
            missing.add(f"{node.op_type} (opset {opsets.get(domain, opsets.get('', 0))})")
    if missing:
        raise Unconvertible(
            f"the graph cannot be fine-tuned: onnx2torch has no converter for {', '.join(sorted(missing))}"
        )


@dataclass
class Convertible:
    """A graph converted to PyTorch, and which of its weight tensors each trained tensor is."""

    graph: onnx.ModelProto  # normalised: every weight an initializer
    module: nn.Module
    weights: dict[str, str]  # torch parameter name -> ONNX initializer name


def convert(path: Path) -> Convertible:
    """Load, check and convert the graph at `path`; `Unconvertible` when it cannot be."""
    try:
        graph = normalised_graph(onnx.load(str(path)))
    except Exception as exc:  # protobuf's errors: not an ONNX file
        raise Unconvertible(f"{path} is not an ONNX model: {exc}") from None
    check_convertible(graph)
    onnx2torch, _ = _onnx2torch()
    try:
        module: nn.Module = onnx2torch.convert(graph)
    except Exception as exc:  # a converter that refuses this node's attributes
        raise Unconvertible(f"the graph cannot be fine-tuned: onnx2torch: {exc}") from None
    weights = _trainable(graph, module)
    if not weights:
        raise Unconvertible("the graph cannot be fine-tuned: none of its weight tensors was found in the conversion")
    return Convertible(graph=graph, module=module.eval(), weights=weights)


def _trainable(graph: onnx.ModelProto, module: nn.Module) -> dict[str, str]:
    """Torch tensors holding exactly one float initializer's values (found by value, uniquely),
    made trainable parameters; every other parameter is frozen."""
    by_value: dict[tuple[tuple[int, ...], bytes], list[str]] = {}
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size >= MIN_TRAINED_SIZE:
            by_value.setdefault((array.shape, array.tobytes()), []).append(init.name)
    weights: dict[str, str] = {}
    for owner_name, owner in module.named_modules():
        for name, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            if "running_" in name or tensor is None or tensor.dtype != torch.float32:
                continue  # batch-norm statistics stay frozen
            found = by_value.get((tuple(tensor.shape), tensor.detach().numpy().tobytes()), [])
            full = f"{owner_name}.{name}" if owner_name else name
            if len(found) != 1:
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(False)
                continue
            if not isinstance(tensor, nn.Parameter):  # onnx2torch keeps a MatMul's weight as a buffer
                delattr(owner, name)
                owner.register_parameter(name, nn.Parameter(tensor.detach().clone()))
            weights[full] = found[0]
    return weights


class _Tuning(nn.Module):
    """The converted graph as the training loop needs it: log probabilities for a graph that
    answers probabilities (cross-entropy of log p is the negative log likelihood), batch norm
    always in inference mode (its statistics were learnt on far more data than a review round)."""

    def __init__(self, network: nn.Module, output_kind: str) -> None:
        super().__init__()
        self.network = network
        self.output_kind = output_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(x)
        if self.output_kind == "probabilities":
            return torch.log(out.clamp_min(PROBABILITY_FLOOR))
        return out

    def train(self, mode: bool = True) -> _Tuning:
        super().train(mode)
        for layer in self.network.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()
        return self


def tuning(converted: Convertible, output_kind: str, config: TrainConfig) -> tuple[nn.Module, TrainConfig]:
    """What the training loop runs for a fine-tune: the converted graph as it trains (`_Tuning`),
    and the protocol at the fine-tuning learning rate."""
    tuned = TrainConfig(**{**config.to_dict(), "learning_rate": config.learning_rate * LEARNING_RATE_FACTOR})
    logger.info(
        "fine-tuning %d weight tensors (%d values), learning rate %.2g",
        len(converted.weights),
        sum(p.numel() for p in converted.module.parameters() if p.requires_grad),
        tuned.learning_rate,
    )
    return _Tuning(converted.module, output_kind), tuned


def transplant(converted: Convertible) -> bytes:
    """The normalised graph with every trained tensor's current values in its initializer."""
    graph = onnx.ModelProto()
    graph.CopyFrom(converted.graph)
    tensors = dict(converted.module.named_parameters())
    by_name = {init.name: init for init in graph.graph.initializer}
    for torch_name, init_name in converted.weights.items():
        values = tensors[torch_name].detach().numpy().astype(np.float32)
        by_name[init_name].CopyFrom(numpy_helper.from_array(values, init_name))
    serialised: bytes = graph.SerializeToString()
    return serialised
