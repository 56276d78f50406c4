"""Trainers: the functions a model's spec names (`trainer: package.module:function`) to train it again.

A trainer takes a `TrainRequest` (the spec, the training and validation examples with the dataset
version folders they were read from, and the fixed protocol with its seed) and returns a `Trained`:
a torch module that maps a batch of the spec's input tensors to (batch, classes) logits, and its
per-epoch history. Everything else (evaluation, ONNX export with a dynamic batch axis, the parity
check, the store, MLflow, the gate) is the project's, the same for every model.

Three ship here: `digits_cnn` (the default model), `image_cnn` (any image spec, from scratch) and
`fine_tune` (the model's own imported ONNX graph, its weights trained further: `models.finetune`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from torch import nn

from models import digits
from models.network import DigitsCNN, SmallConvNet
from models.spec import ImageInput, ModelSpec
from models.train import EpochMetrics, History, Normalised, TrainConfig, seed_everything, train

logger = logging.getLogger(__name__)


class TrainerNotFound(LookupError):
    """The spec names a trainer that cannot be imported or is not a function."""


@dataclass(frozen=True)
class Examples:
    """Labelled samples as the model takes them: input tensors and class indices into the spec's classes."""

    inputs: NDArray[np.float32]
    labels: NDArray[np.int64]
    folder: Path | None = None  # the dataset version they were read from; None when made in memory

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")


@dataclass(frozen=True)
class TrainRequest:
    spec: ModelSpec
    train: Examples
    validation: Examples
    config: TrainConfig  # the fixed protocol, its seed included
    on_epoch: Callable[[EpochMetrics], None] | None = None
    base: Path | None = None  # the model's own ONNX graph, for a trainer that starts from it


@dataclass(frozen=True)
class Trained:
    module: nn.Module  # (batch, *spec input shape) -> (batch, classes) scores of the spec's output kind
    history: History
    graph: bytes | None = None  # an ONNX graph the trainer made itself; else the module is exported


FINE_TUNE = "models.trainers:fine_tune"


Trainer = Callable[[TrainRequest], Trained]


def load_trainer(path: str) -> Trainer:
    """The function `package.module:function` names, or `TrainerNotFound` saying what is missing."""
    module_name, sep, function_name = path.partition(":")
    if not sep or not module_name or not function_name:
        raise TrainerNotFound(f"trainer {path!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TrainerNotFound(f"trainer {path!r}: module {module_name!r} cannot be imported ({exc})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise TrainerNotFound(f"trainer {path!r}: module {module_name!r} has no {function_name!r}")
    if not callable(function):
        raise TrainerNotFound(f"trainer {path!r}: {function_name!r} is a {type(function).__name__}, not a function")
    trainer: Trainer = function
    return trainer


def check_before_training(trainer: str, base: Path | None) -> None:
    """What a trainer refuses before any run starts: fine-tuning without a graph, or a graph the
    converter cannot convert (`models.finetune.Unconvertible`, naming the operator)."""
    if trainer != FINE_TUNE:
        return
    from models import finetune

    if base is None:
        raise finetune.Unconvertible("fine_tune needs the model's own ONNX graph, and none is stored")
    finetune.convert(base)


def _train(model: nn.Module, request: TrainRequest, config: TrainConfig | None = None) -> History:
    return train(
        model,
        request.train.inputs,
        request.train.labels,
        config or request.config,
        x_validation=request.validation.inputs,
        y_validation=request.validation.labels,
        on_epoch=request.on_epoch,
    )


def _fit(model: nn.Module, request: TrainRequest) -> Trained:
    history = _train(model, request)
    return Trained(module=model.eval(), history=history)


def new_digits_model(seed: int) -> Normalised:
    """A freshly initialised digits network; its initial weights depend only on `seed`."""
    seed_everything(seed)
    return Normalised(DigitsCNN(num_classes=len(digits.CLASS_NAMES)), scale=digits.PIXEL_MAX)


def digits_cnn(request: TrainRequest) -> Trained:
    """The default model: `DigitsCNN` on raw 8x8 pixels in [0, 16]."""
    spec = request.spec
    if spec.signature().input_shape != digits.INPUT_SHAPE or len(spec.classes) != len(digits.CLASS_NAMES):
        raise ValueError(f"digits_cnn trains {digits.INPUT_SHAPE} inputs of {len(digits.CLASS_NAMES)} classes")
    return _fit(new_digits_model(request.config.seed), request)


def image_cnn(request: TrainRequest) -> Trained:
    """`SmallConvNet` sized from an image spec (channels, layout, classes), trained from scratch."""
    image = request.spec.input
    if not isinstance(image, ImageInput):
        raise ValueError("image_cnn trains image models; this spec's input is a tensor")
    seed_everything(request.config.seed)
    model = SmallConvNet(image.channels, len(request.spec.classes), channels_last=image.layout == "NHWC")
    logger.info(
        "image_cnn: %d training and %d validation images of %dx%d %s, %d classes",
        len(request.train.labels),
        len(request.validation.labels),
        image.width,
        image.height,
        image.mode,
        len(request.spec.classes),
    )
    return _fit(model, request)


def fine_tune(request: TrainRequest) -> Trained:
    """The model's own graph (`request.base`, as imported), its weights trained on the version."""
    from models import finetune

    if request.base is None:
        raise finetune.Unconvertible("fine_tune needs the model's own ONNX graph (TrainRequest.base)")
    converted = finetune.convert(request.base)
    module, config = finetune.tuning(converted, request.spec.output_kind, request.config)
    history = _train(module, request, config)
    return Trained(module=converted.module.eval(), history=history, graph=finetune.transplant(converted))
