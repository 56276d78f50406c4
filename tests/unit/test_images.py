"""Image pre-processing: every resize rule, interpolation, channel order, pixel scale and padding of
`models.images.to_tensor` against an implementation written here with OpenCV and numpy directly,
and the tensors of specs that set none of the newer options pinned to the implementation before them."""

from __future__ import annotations

import itertools
import math
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from models import images
from models.spec import ImageInput

pytestmark = pytest.mark.unit

WIDTH, HEIGHT, SHORTER_SIDE = 32, 16, 36
SIZES = {"tall": (13, 61), "wide": (97, 17), "square": (41, 41), "small": (5, 7)}  # (w, h); wide: over 5:1
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Option sets beside the rule and the interpolation: every newer option, in a few combinations.
VARIANTS: dict[str, dict[str, Any]] = {
    "rgb": {"mean": [0.5], "std": [0.25]},
    "bgr-255": {"channel_order": "BGR", "max_pixel": 255, "mean": [123.675, 116.28, 103.53],
                "std": [58.395, 57.12, 57.375], "pad_value": [114, 20, 255], "align": "top-left", "layout": "NHWC"},
    "grey": {"mode": "L", "mean": [0.5], "std": [0.5], "pad_value": [-1.5], "pad_units": "normalised"},
    "bgr-imagenet": {"channel_order": "BGR", **IMAGENET, "pad_value": [0.1, -0.2, 0.3], "pad_units": "normalised"},
}  # fmt: skip
CV2_FLAGS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
             "area": cv2.INTER_AREA, "lanczos4": cv2.INTER_LANCZOS4}  # fmt: skip


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over a smooth gradient, so that every interpolation has something to disagree about."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = np.stack([xs * 255 / max(1, width - 1), ys * 255 / max(1, height - 1), (xs + ys) % 256], axis=-1)
    noisy = np.clip(smooth * 0.6 + rng.integers(0, 102, size=(height, width, 3)), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8), "RGB")


def spec_of(resize: str, interpolation: str, variant: str) -> ImageInput:
    shorter = {"shorter_side": SHORTER_SIDE} if resize == "shorter-side-crop" else {}
    return ImageInput.model_validate({"width": WIDTH, "height": HEIGHT, "resize": resize,
                                      "interpolation": interpolation, **shorter, **VARIANTS[variant]})  # fmt: skip


# ---- the reference: each step as the projects that use it write it, with OpenCV and numpy ----


def ref_resize(pixels: NDArray[np.uint8], size: tuple[int, int], interpolation: str) -> NDArray[np.uint8]:
    if interpolation == "pillow-bilinear":
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    return np.asarray(cv2.resize(pixels, size, interpolation=CV2_FLAGS[interpolation]))


def ref_normalise(pixels: NDArray[np.uint8], spec: ImageInput) -> NDArray[np.float32]:
    values = pixels.astype(np.float32)
    if values.ndim == 2:
        values = values[:, :, None]
    values = values * np.float32(spec.max_pixel / 255)
    mean, std = np.asarray(spec.mean, dtype=np.float32), np.asarray(spec.std, dtype=np.float32)
    return ((values - mean) / std).astype(np.float32)


def ref_pad(spec: ImageInput) -> list[float]:
    pad = [float(v) for v in spec.pad_value] * (spec.channels // len(spec.pad_value))
    if spec.pad_units == "normalised":
        return pad
    mean = list(spec.mean) * (spec.channels // len(spec.mean))
    std = list(spec.std) * (spec.channels // len(spec.std))
    return [(v * spec.max_pixel / 255 - m) / s for v, m, s in zip(pad, mean, std, strict=True)]


def ref_border(values: NDArray[np.float32], spec: ImageInput, top: int, left: int) -> NDArray[np.float32]:
    """Padded to W x H with cv2.copyMakeBorder (which drops a single channel's axis)."""
    h, w = values.shape[:2]
    pad = ref_pad(spec)
    bordered = cv2.copyMakeBorder(values, top, HEIGHT - h - top, left, WIDTH - w - left, cv2.BORDER_CONSTANT,
                                  value=pad if spec.channels == 3 else pad[0])  # fmt: skip
    out = np.asarray(bordered, dtype=np.float32)
    return out[:, :, None] if out.ndim == 2 else out


def reference(image: Image.Image, spec: ImageInput) -> NDArray[np.float32]:
    if spec.mode == "L":
        pixels = np.asarray(image.convert("L"))
    else:
        pixels = np.asarray(image.convert("RGB"))
        if spec.channel_order == "BGR":
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    h, w = pixels.shape[:2]
    if spec.resize == "stretch":
        out = ref_normalise(ref_resize(pixels, (WIDTH, HEIGHT), spec.interpolation), spec)
    elif spec.resize in ("fit", "crop"):
        scale = (min if spec.resize == "fit" else max)(WIDTH / w, HEIGHT / h)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        scaled = ref_resize(pixels, (sw, sh), spec.interpolation)
        if spec.resize == "fit":
            top, left = ((HEIGHT - sh) // 2, (WIDTH - sw) // 2) if spec.align == "center" else (0, 0)
            out = ref_border(ref_normalise(scaled, spec), spec, top, left)
        else:  # the centre cut, rounding the offset up (as Pillow's paste at a negative offset does)
            top, left = math.ceil((sh - HEIGHT) / 2), math.ceil((sw - WIDTH) / 2)
            out = ref_normalise(scaled[top : top + HEIGHT, left : left + WIDTH], spec)
    elif spec.resize == "shorter-side-crop":  # PaddleClas: ResizeImage(resize_short), CropImage
        assert spec.shorter_side is not None
        percent = float(spec.shorter_side) / min(w, h)
        scaled = ref_resize(pixels, (round(w * percent), round(h * percent)), spec.interpolation)
        ih, iw = scaled.shape[:2]
        top, left = (ih - HEIGHT) // 2, (iw - WIDTH) // 2
        out = ref_normalise(scaled[top : top + HEIGHT, left : left + WIDTH], spec)
    else:  # fit-height, PaddleOCR's resize_norm_img
        ratio = w / float(h)
        resized_w = WIDTH if math.ceil(HEIGHT * ratio) > WIDTH else math.ceil(HEIGHT * ratio)
        resized = ref_normalise(ref_resize(pixels, (resized_w, HEIGHT), spec.interpolation), spec)
        out = np.empty((HEIGHT, WIDTH, spec.channels), dtype=np.float32)
        out[...] = np.asarray(ref_pad(spec), dtype=np.float32)
        out[:, :resized_w] = resized
    return out.transpose(2, 0, 1) if spec.layout == "NCHW" else out


@pytest.mark.parametrize(
    ("resize", "interpolation"),
    list(itertools.product(["stretch", "fit", "crop", "shorter-side-crop", "fit-height"],
                           [*CV2_FLAGS, "pillow-bilinear"])),
)  # fmt: skip
def test_every_option_gives_what_opencv_and_numpy_give(resize: str, interpolation: str) -> None:
    for (variant, (name, (w, h))), seed in zip(itertools.product(VARIANTS, SIZES.items()), itertools.count()):
        spec = spec_of(resize, interpolation, variant)
        image = picture(w, h, seed)
        got = images.to_tensor(image, spec)
        expected = reference(image, spec)
        assert got.shape == spec.tensor_shape and got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=f"{variant}, {name} {w}x{h}")
        low, high = spec.value_range()
        assert low - 1e-5 <= got.min() and got.max() <= high + 1e-5


def test_the_rules_round_as_their_projects_do() -> None:
    spec = ImageInput(width=WIDTH, height=HEIGHT)
    # crop: 97x17 scaled by 16/17 to 91x16; the 32 wide cut starts ceil(59/2) = 30 in (not 59//2 = 29)
    assert images.placement(97, 17, spec.model_copy(update={"resize": "crop"})) == images.Placement((91, 16), (-30, 0))
    # shorter-side-crop: (97*36/17, 36) rounded, then floor offsets ((205 - 32)//2, (36 - 16)//2)
    ssc = spec.model_copy(update={"resize": "shorter-side-crop", "shorter_side": SHORTER_SIDE})
    assert images.placement(97, 17, ssc) == images.Placement((205, 36), (-86, -10))
    # fit-height: ceil(16 * 5/7) = 12 wide on the left; wider than 2:1 is stretched to 32
    fh = spec.model_copy(update={"resize": "fit-height"})
    assert images.placement(5, 7, fh) == images.Placement((12, 16), (0, 0))
    assert images.placement(97, 17, fh) == images.Placement((32, 16), (0, 0))
    # fit: 13x61 scaled by 16/61 to 3x16, centred at (14, 0) or at the top left
    fit = spec.model_copy(update={"resize": "fit"})
    assert images.placement(13, 61, fit) == images.Placement((3, 16), (14, 0))
    assert images.placement(13, 61, fit.model_copy(update={"align": "top-left"})).at == (0, 0)


def test_bgr_reverses_the_channels_and_pixel_padding_is_normalised_as_pixels_are() -> None:
    image = picture(41, 41)
    rgb = images.to_tensor(image, ImageInput(width=41, height=41))
    bgr = images.to_tensor(image, ImageInput(width=41, height=41, channel_order="BGR"))
    np.testing.assert_array_equal(bgr, rgb[::-1])
    for variant in VARIANTS:
        spec = spec_of("fit", "linear", variant)
        np.testing.assert_allclose(images.pad_value(spec), spec.normalised_pad(), rtol=1e-6)
    white = Image.new("RGB", (64, 8), "white")  # 8:1, so fit leaves 6 rows above and below
    fitted = images.to_tensor(white, ImageInput(width=16, height=14, resize="fit", pad_value=(255, 0, 0),
                                                mean=(0.5,), std=(0.5,)))  # fmt: skip
    assert (fitted[:, 6:8] == 1).all() and (fitted[0, :6] == 1).all() and (fitted[1:, :6] == -1).all()


# ---- specs without the newer options: the tensors of the implementation before them, exactly ----


def _old_to_tensor(image: Image.Image, spec: ImageInput) -> NDArray[np.float32]:
    """`models.images.to_tensor` as it was before channel order, interpolation and padding existed."""
    converted = image.convert(spec.mode)
    sized = _old_resize(converted, spec)
    pixels = np.asarray(sized, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (pixels - mean) / std
    if spec.layout == "NCHW":
        normalised = normalised.transpose(2, 0, 1)
    return np.ascontiguousarray(normalised, dtype=np.float32)


def _old_resize(image: Image.Image, spec: ImageInput) -> Image.Image:
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


@pytest.mark.parametrize("resize", ["stretch", "fit", "crop"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_specs_without_the_new_options_give_the_tensors_they_always_did(resize: str, mode: str) -> None:
    normalisations: list[dict[str, Any]] = [
        {},
        {"mean": [0.5], "std": [0.25], "layout": "NHWC"},
        IMAGENET if mode == "RGB" else {"mean": [0.449], "std": [0.226]},
    ]
    sizes = [*SIZES.values(), (WIDTH, HEIGHT), (WIDTH * 3, HEIGHT * 3), (101, 64), (64, 101)]
    for options, (w, h) in itertools.product(normalisations, sizes):
        spec = ImageInput.model_validate({"width": WIDTH, "height": HEIGHT, "mode": mode, "resize": resize, **options})
        image = picture(w, h, seed=w * h)
        np.testing.assert_array_equal(images.to_tensor(image, spec), _old_to_tensor(image, spec), f"{options} {w}x{h}")
