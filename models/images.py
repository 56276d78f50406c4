"""Images in: decode what a client sent and turn it into the tensor an image model takes.

Pure functions over bytes and arrays, as the spec's `ImageInput` describes them. Decoding checks
the format and the pixel count from the header before any pixel is decoded (a decompression bomb
is refused unread), and a truncated or corrupt file is an `ImageError`, never a partial image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

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


def to_tensor(image: Image.Image, spec: ImageInput) -> NDArray[np.float32]:
    """One decoded image as the model's input: colour mode, size, [0, 1], normalisation, layout."""
    converted = image.convert(spec.mode)
    sized = _resize(converted, spec)
    pixels = np.asarray(sized, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (pixels - mean) / std
    if spec.layout == "NCHW":
        normalised = normalised.transpose(2, 0, 1)
    return np.ascontiguousarray(normalised, dtype=np.float32)


def _resize(image: Image.Image, spec: ImageInput) -> Image.Image:
    size = (spec.width, spec.height)
    if image.size == size:
        return image
    if spec.resize == "stretch":
        return image.resize(size, Image.Resampling.BILINEAR)
    scale = (min if spec.resize == "fit" else max)(spec.width / image.width, spec.height / image.height)
    scaled = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
    )
    canvas = Image.new(spec.mode, size)  # black
    canvas.paste(scaled, ((spec.width - scaled.width) // 2, (spec.height - scaled.height) // 2))
    return canvas


def preprocess(data: bytes, spec: ImageInput) -> NDArray[np.float32]:
    """Bytes as sent to the model's input tensor, or `ImageError`."""
    return to_tensor(decode(data, spec).image, spec)
