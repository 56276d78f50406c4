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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.signature import Signature

ImageFormat = Literal["png", "jpeg", "webp"]
# What the graph's output holds per class; the service's scores are probabilities in every case.
OutputKind = Literal["logits", "probabilities", "log_probabilities"]
Resize = Literal["stretch", "fit", "crop", "shorter-side-crop", "fit-height"]
# pillow-bilinear: Pillow's BILINEAR (it averages over the footprint when shrinking), the default
# since the first image models; the others are OpenCV's cv2.resize flags INTER_NEAREST, INTER_LINEAR,
# INTER_CUBIC, INTER_AREA and INTER_LANCZOS4, as the many projects that pre-process with OpenCV use.
Interpolation = Literal["pillow-bilinear", "nearest", "linear", "cubic", "area", "lanczos4"]
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
    """Samples sent as encoded images, decoded and pre-processed into the model's tensor.

    The steps, in order (`models.images.to_tensor`): colour mode; channel order; resize by
    `resize` with `interpolation`; pixel values scaled to [0, `max_pixel`]; `(x - mean) / std`
    per channel; padding (fit, fit-height) with `pad_value`; layout.
    """

    kind: Literal["image"] = "image"
    formats: tuple[ImageFormat, ...] = Field(("png", "jpeg", "webp"), min_length=1)
    width: Dimension
    height: Dimension
    mode: Literal["L", "RGB"] = "RGB"
    # BGR: the colour channels reversed, as OpenCV reads images (only with mode RGB).
    channel_order: Literal["RGB", "BGR"] = "RGB"
    # stretch: to width x height ignoring the aspect ratio; fit: a letterbox, scaled to fit inside
    # and padded (`align`, `pad_value`); crop: scaled to cover, the centre cut out;
    # shorter-side-crop: the shorter side scaled to `shorter_side`, then the centre width x height
    # cut out (ImageNet's recipe); fit-height: scaled to `height` keeping the aspect ratio up to
    # `width` (stretched to `width` beyond it), placed on the left and padded on the right.
    resize: Resize = "stretch"
    shorter_side: Dimension | None = None
    align: Literal["center", "top-left"] = "center"
    interpolation: Interpolation = "pillow-bilinear"
    # The value of a white pixel before normalisation: 1 (pixels scaled to [0, 1]) or 255 (kept).
    max_pixel: Literal[1, 255] = 1
    mean: tuple[float, ...] = Field(default=(0.0,), min_length=1, max_length=3)
    std: tuple[float, ...] = Field(default=(1.0,), min_length=1, max_length=3)
    # The padding's value, one or per channel (in the channel order above): an 8-bit pixel value
    # (0-255) painted before normalisation, or a value of the normalised tensor.
    pad_value: tuple[float, ...] = Field(default=(0.0,), min_length=1, max_length=3)
    pad_units: Literal["pixels", "normalised"] = "pixels"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    max_pixels: int = Field(40_000_000, ge=1, description="Larger images are refused before decoding.")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @model_validator(mode="after")
    def _normalisation(self) -> ImageInput:
        for name in ("mean", "std", "pad_value"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} has {len(values)} values; mode {self.mode} needs 1 or {self.channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {list(self.std)}")
        if self.pad_units == "pixels" and any(not 0 <= v <= 255 for v in self.pad_value):
            raise ValueError(f"pad_value in pixels is an 8-bit value (0 to 255), got {list(self.pad_value)}")
        if self.channel_order == "BGR" and self.mode == "L":
            raise ValueError("channel_order BGR needs mode RGB (a grey image has one channel)")
        if self.resize == "shorter-side-crop":
            if self.shorter_side is None:
                raise ValueError("resize shorter-side-crop needs shorter_side (e.g. 256 for a 224 crop)")
            if self.shorter_side < max(self.width, self.height):
                raise ValueError(
                    f"shorter_side {self.shorter_side} must be at least the crop's larger side "
                    f"({max(self.width, self.height)})"
                )
        elif self.shorter_side is not None:
            raise ValueError(f"shorter_side is only read by resize shorter-side-crop, not {self.resize}")
        return self

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        """One pre-processed sample's shape, as the ONNX graph takes it."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    def value_range(self) -> tuple[float, float]:
        """The range of pre-processed values: pixels in [0, max_pixel], normalised per channel,
        and the padding."""
        mean, std = self.per_channel(self.mean), self.per_channel(self.std)
        lows = [(0.0 - m) / s for m, s in zip(mean, std, strict=True)]
        highs = [(self.max_pixel - m) / s for m, s in zip(mean, std, strict=True)]
        if self.resize in ("fit", "fit-height"):
            pads = self.normalised_pad()
            lows, highs = [*lows, *pads], [*highs, *pads]
        return min(lows), max(highs)

    def normalised_pad(self) -> tuple[float, ...]:
        """The padding per channel as a value of the normalised tensor."""
        pad = self.per_channel(self.pad_value)
        if self.pad_units == "normalised":
            return pad
        scale = self.max_pixel / 255.0
        return tuple(
            (v * scale - m) / s
            for v, m, s in zip(pad, self.per_channel(self.mean), self.per_channel(self.std), strict=True)
        )

    def per_channel(self, values: tuple[float, ...]) -> tuple[float, ...]:
        return values if len(values) == self.channels else values * self.channels


class ModelSpec(_Strict):
    """Everything the product needs to know about a classifier, apart from its weights."""

    input: TensorInput | ImageInput = Field(discriminator="kind")
    classes: tuple[ClassName, ...] = Field(min_length=2, max_length=100_000)
    onnx_input: str = Field("input", min_length=1)
    onnx_output: str = Field("logits", min_length=1)
    # What `onnx_output` holds: scores are softmax(logits), the probabilities as they are, or
    # exp(log probabilities). A graph that ends in Softmax answers probabilities.
    output_kind: OutputKind = "logits"
    trainer: str | None = Field(None, pattern=TRAINER_PATTERN, description="package.module:function")

    @field_validator("classes", mode="before")
    @classmethod
    def _numbers_as_names(cls, value: Any) -> Any:
        """`classes: [0, 180]` in YAML: numbers are names too (as written; booleans are not)."""
        if isinstance(value, list | tuple):
            return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value]
        return value

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
            input_shape=tuple(shape),
            class_names=tuple(self.classes),
            dtype="float32",
            min_value=low,
            max_value=high,
            input_name=self.onnx_input,
            output_name=self.onnx_output,
        )

    @classmethod
    def of_signature(cls, signature: Signature) -> ModelSpec:
        """The spec of a model stored before specs existed: a tensor model, as its signature says."""
        tensor = TensorInput(shape=signature.input_shape, min_value=signature.min_value, max_value=signature.max_value)
        return cls(
            input=tensor,
            classes=signature.class_names,
            onnx_input=signature.input_name,
            onnx_output=signature.output_name,
        )

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
