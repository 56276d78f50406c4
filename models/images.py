"""Images in: decode what a client sent and turn it into the tensor an image model takes.

Pure functions over bytes and arrays, as the spec's `ImageInput` describes them. Decoding checks
the format and the pixel count from the header before any pixel is decoded (a decompression bomb
is refused unread), and a truncated or corrupt file is an `ImageError`, never a partial image.

Pre-processing (`to_tensor`) takes these steps, in order: the colour mode (Pillow's `convert`);
the 8-bit pixels as an array, its colour channels reversed for `channel_order: BGR` (as OpenCV
reads images); the resize rule, whose `Placement` says the size the image is scaled to and where it
lands on the width x height canvas, scaled with Pillow's BILINEAR (`pillow-bilinear`, the default)
or `cv2.resize` with the OpenCV flag `interpolation` names; the cut (crop rules); float32 values
scaled by max_pixel/255; `(x - mean) / std`; the rest of the canvas (fit, fit-height) filled with
the padding, normalised as pixels are; the layout. The rules, for an image w x h and a spec
W x H (each function's docstring has its formula):

- stretch: scaled to W x H.
- fit: a letterbox, scale = min(W/w, H/h), centred (or top-left), padded.
- crop: scale = max(W/w, H/h), the centre cut out.
- shorter-side-crop: the shorter side scaled to `shorter_side`, the centre W x H cut out
  (PaddleClas's ResizeImage(resize_short) and CropImage).
- fit-height: scaled to height H keeping the aspect ratio up to width W, on the left, padded
  on the right (PaddleOCR's classifier, `resize_norm_img`).

The projects these rules come from round as their code does (`round` is Python's, half to even),
so a spec that names their steps gives their tensors; specs that set none of the newer options
give the tensors they always did.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from models.spec import ImageInput

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}  # Pillow's names -> the spec's
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageError(ValueError):
    """Bytes that are not an image this model accepts; the message says why."""


@dataclass(frozen=True)
class Decoded:
    image: Image.Image
    format: str  # png, jpeg or webp
    media_type: str


def decode(data: bytes, spec: ImageInput) -> Decoded:
    """Open, check and fully decode one image; raises `ImageError` naming the problem."""
    if not data:
        raise ImageError("the image is empty")
    try:
        opened = Image.open(io.BytesIO(data), formats=list(FORMATS))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"not an image in an accepted format ({', '.join(spec.formats)})") from None
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above any sane max_pixels
        raise ImageError(f"the image has too many pixels (over {spec.max_pixels})") from None
    found = FORMATS.get(opened.format or "", "")
    if found not in spec.formats:
        raise ImageError(f"{found or opened.format} images are not accepted; send {', '.join(spec.formats)}")
    width, height = opened.size
    if width * height > spec.max_pixels:
        raise ImageError(
            f"the image has {width}x{height} = {width * height} pixels, over the limit of {spec.max_pixels}"
        )
    try:
        opened.load()
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's ways of saying truncated or corrupt
        raise ImageError(f"the {found} image is truncated or corrupt: {exc}") from None
    return Decoded(image=opened, format=found, media_type=MEDIA_TYPES[found])


# The `interpolation` names other than pillow-bilinear, as cv2.resize flags.
CV2_FLAGS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos4": cv2.INTER_LANCZOS4,
}


@dataclass(frozen=True)
class Placement:
    """Where a resize rule puts an image: scaled to `size` (width, height), its top-left corner at
    `at` (x, y) on the W x H canvas. A negative offset cuts that much off; canvas it leaves
    uncovered is padding."""

    size: tuple[int, int]
    at: tuple[int, int]


def _stretch(w: int, h: int, spec: ImageInput) -> Placement:
    """size (W, H), at (0, 0): the aspect ratio is not kept."""
    return Placement((spec.width, spec.height), (0, 0))


def _scaled_by(w: int, h: int, scale: float) -> tuple[int, int]:
    return max(1, round(w * scale)), max(1, round(h * scale))


def _fit(w: int, h: int, spec: ImageInput) -> Placement:
    """scale = min(W/w, H/h); size (sw, sh) = (max(1, round(w*scale)), max(1, round(h*scale)));
    at ((W - sw)//2, (H - sh)//2), or (0, 0) with align top-left; the rest is padding."""
    sw, sh = _scaled_by(w, h, min(spec.width / w, spec.height / h))
    if spec.align == "top-left":
        return Placement((sw, sh), (0, 0))
    return Placement((sw, sh), ((spec.width - sw) // 2, (spec.height - sh) // 2))


def _crop(w: int, h: int, spec: ImageInput) -> Placement:
    """scale = max(W/w, H/h); size as fit; at ((W - sw)//2, (H - sh)//2), which is negative: the
    offset into the image is ceil((sw - W)/2), as Pillow's paste at that offset has always cut it."""
    sw, sh = _scaled_by(w, h, max(spec.width / w, spec.height / h))
    return Placement((sw, sh), ((spec.width - sw) // 2, (spec.height - sh) // 2))


def _shorter_side_crop(w: int, h: int, spec: ImageInput) -> Placement:
    """percent = S / min(w, h) (S = shorter_side); size (sw, sh) = (int(round(w*percent)),
    int(round(h*percent))); the centre cut from offset ((sw - W)//2, (sh - H)//2) into the image."""
    assert spec.shorter_side is not None  # the spec's validator requires it for this rule
    percent = spec.shorter_side / min(w, h)
    sw, sh = round(w * percent), round(h * percent)
    return Placement((sw, sh), (-((sw - spec.width) // 2), -((sh - spec.height) // 2)))


def _fit_height(w: int, h: int, spec: ImageInput) -> Placement:
    """sw = W if ceil(H * (w/h)) > W else ceil(H * (w/h)); size (sw, H), at (0, 0): on the left,
    padded on the right (the ratio w/h is computed first, as PaddleOCR does, for its rounding)."""
    wanted = math.ceil(spec.height * (w / h))
    return Placement((spec.width if wanted > spec.width else wanted, spec.height), (0, 0))


RULES: dict[str, Callable[[int, int, ImageInput], Placement]] = {
    "stretch": _stretch,
    "fit": _fit,
    "crop": _crop,
    "shorter-side-crop": _shorter_side_crop,
    "fit-height": _fit_height,
}


def placement(width: int, height: int, spec: ImageInput) -> Placement:
    """Where the spec's resize rule puts an image of `width` x `height` (after the colour mode)."""
    return RULES[spec.resize](width, height, spec)


def to_tensor(image: Image.Image, spec: ImageInput) -> NDArray[np.float32]:
    """One decoded image as the model's input: colour mode, channel order, resize, scale,
    normalisation, padding, layout (the module docstring has the rules)."""
    converted = image.convert(spec.mode)
    where = placement(converted.width, converted.height, spec)
    pixels = _scaled(converted, where.size, spec)
    (x, y), (h, w) = where.at, pixels.shape[:2]
    visible = pixels[max(0, -y) : min(h, spec.height - y), max(0, -x) : min(w, spec.width - x)]
    normalised = _normalise(visible, spec)
    if normalised.shape[:2] != (spec.height, spec.width):
        canvas = np.empty((spec.height, spec.width, spec.channels), dtype=np.float32)
        canvas[...] = pad_value(spec)
        top, left = max(0, y), max(0, x)
        canvas[top : top + normalised.shape[0], left : left + normalised.shape[1]] = normalised
        normalised = canvas
    if spec.layout == "NCHW":
        normalised = normalised.transpose(2, 0, 1)
    return np.ascontiguousarray(normalised, dtype=np.float32)


def _scaled(image: Image.Image, size: tuple[int, int], spec: ImageInput) -> NDArray[np.uint8]:
    """The 8-bit pixels (height, width, channels) in the spec's channel order, scaled to `size`."""
    if spec.interpolation == "pillow-bilinear":
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        pixels: NDArray[np.uint8] = np.asarray(image, dtype=np.uint8)
        if spec.channel_order == "BGR":  # per-channel resampling: reversing before or after is the same
            pixels = pixels[:, :, ::-1]
    else:
        pixels = np.asarray(image, dtype=np.uint8)
        if spec.channel_order == "BGR":
            pixels = np.ascontiguousarray(pixels[:, :, ::-1])
        if (pixels.shape[1], pixels.shape[0]) != size:  # cv2.resize copies at the same size anyway
            pixels = np.asarray(cv2.resize(pixels, size, interpolation=CV2_FLAGS[spec.interpolation]), np.uint8)
    return pixels[:, :, np.newaxis] if pixels.ndim == 2 else pixels


def _normalise(pixels: NDArray[Any], spec: ImageInput) -> NDArray[np.float32]:
    """float32, scaled by max_pixel/255, then (x - mean) / std per channel."""
    values = np.array(pixels, dtype=np.float32)
    if spec.max_pixel == 1:
        values /= 255.0
    values -= np.asarray(spec.mean, dtype=np.float32)
    values /= np.asarray(spec.std, dtype=np.float32)
    return values


def pad_value(spec: ImageInput) -> NDArray[np.float32]:
    """The padding per channel as a value of the normalised tensor: a pixel value normalised
    exactly as pixels are (float32 steps), or the normalised value as given."""
    pad = np.asarray(spec.per_channel(spec.pad_value), dtype=np.float32)
    return pad if spec.pad_units == "normalised" else _normalise(pad, spec)


def preprocess(data: bytes, spec: ImageInput) -> NDArray[np.float32]:
    """Bytes as sent to the model's input tensor, or `ImageError`."""
    return to_tensor(decode(data, spec).image, spec)
