"""The model spec: what a team writes once about its classifier, validated, and stored with the model.

A spec says what the model takes (a tensor of a shape and range, or an image: formats, size,
colour mode, resize rule, normalisation and layout), its class names, the names of its ONNX input
and output, and optionally the trainer that can train it again (`package.module:function`).
It is written as YAML or TOML, e.g.

    input:
      kind: image
      width: 64
      height: 64
      mode: RGB
      mean: [0.5, 0.5, 0.5]
      std: [0.25, 0.25, 0.25]
    classes: [circle, square, triangle]
    onnx_input: image
    onnx_output: logits

Serving, review, datasets and retraining read the spec; the `Signature` they check tensors
against is derived from it (for images: the tensor the pre-processing makes).
"""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.signature import Signature

ImageFormat = Literal["png", "jpeg", "webp"]
TRAINER_PATTERN = r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$"
ClassName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
Dimension = Annotated[int, Field(ge=1, le=65536)]


class SpecError(ValueError):
    """A spec that cannot be read or is not valid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TensorInput(_Strict):
    """Samples sent as numbers: one sample has `shape`, every value in [min_value, max_value]."""

    kind: Literal["tensor"] = "tensor"
    shape: tuple[Dimension, ...] = Field(min_length=1, max_length=8)
    dtype: Literal["float32"] = "float32"
    min_value: float
    max_value: float

    @model_validator(mode="after")
    def _range(self) -> TensorInput:
        if self.min_value >= self.max_value:
            raise ValueError(f"min_value {self.min_value:g} must be below max_value {self.max_value:g}")
        return self


class ImageInput(_Strict):
    """Samples sent as encoded images, decoded and pre-processed into the model's tensor."""

    kind: Literal["image"] = "image"
    formats: tuple[ImageFormat, ...] = Field(("png", "jpeg", "webp"), min_length=1)
    width: Dimension
    height: Dimension
    mode: Literal["L", "RGB"] = "RGB"
    # stretch: resize to width x height ignoring the aspect ratio; fit: keep it, pad with black;
    # crop: keep it, scale to cover, cut the centre out.
    resize: Literal["stretch", "fit", "crop"] = "stretch"
    mean: tuple[float, ...] = Field(default=(0.0,), min_length=1, max_length=3)
    std: tuple[float, ...] = Field(default=(1.0,), min_length=1, max_length=3)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    max_pixels: int = Field(40_000_000, ge=1, description="Larger images are refused before decoding.")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @model_validator(mode="after")
    def _normalisation(self) -> ImageInput:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} has {len(values)} values; mode {self.mode} needs 1 or {self.channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {list(self.std)}")
        return self

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        """One pre-processed sample's shape, as the ONNX graph takes it."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    def value_range(self) -> tuple[float, float]:
        """The range of pre-processed values: pixels in [0, 1], normalised per channel."""
        lows = [(0.0 - m) / s for m, s in zip(self._per_channel(self.mean), self._per_channel(self.std), strict=True)]
        highs = [(1.0 - m) / s for m, s in zip(self._per_channel(self.mean), self._per_channel(self.std), strict=True)]
        return min(lows), max(highs)

    def _per_channel(self, values: tuple[float, ...]) -> tuple[float, ...]:
        return values if len(values) == self.channels else values * self.channels


class ModelSpec(_Strict):
    """Everything the product needs to know about a classifier, apart from its weights."""

    input: TensorInput | ImageInput = Field(discriminator="kind")
    classes: tuple[ClassName, ...] = Field(min_length=2, max_length=100_000)
    onnx_input: str = Field("input", min_length=1)
    onnx_output: str = Field("logits", min_length=1)
    trainer: str | None = Field(None, pattern=TRAINER_PATTERN, description="package.module:function")

    @model_validator(mode="after")
    def _distinct_classes(self) -> ModelSpec:
        twice = sorted(name for name, n in Counter(self.classes).items() if n > 1)
        if twice:
            raise ValueError(f"class names must be distinct; repeated: {', '.join(twice)}")
        return self

    def signature(self) -> Signature:
        """The tensor the ONNX graph takes per sample, and the class names it answers with."""
        if isinstance(self.input, TensorInput):
            shape, low, high = self.input.shape, self.input.min_value, self.input.max_value
        else:
            shape, (low, high) = self.input.tensor_shape, self.input.value_range()
        return Signature(
            input_shape=tuple(shape), class_names=tuple(self.classes), dtype="float32",
            min_value=low, max_value=high, input_name=self.onnx_input, output_name=self.onnx_output,
        )  # fmt: skip

    @classmethod
    def of_signature(cls, signature: Signature) -> ModelSpec:
        """The spec of a model stored before specs existed: a tensor model, as its signature says."""
        tensor = TensorInput(shape=signature.input_shape, min_value=signature.min_value, max_value=signature.max_value)
        return cls(
            input=tensor, classes=signature.class_names, onnx_input=signature.input_name,
            onnx_output=signature.output_name,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, unset options left out (BentoML's metadata holds no nulls)."""
        return self.model_dump(mode="json", exclude_none=True)


def parse(raw: Any, *, source: str = "spec") -> ModelSpec:
    """Validate decoded YAML or TOML; raises `SpecError` naming each invalid field."""
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"{source} is not a valid model spec: {problems}") from None


def load(path: Path) -> ModelSpec:
    """Read a spec file: `.toml`, or YAML (`.yaml`, `.yml`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    return parse(raw, source=str(path))
