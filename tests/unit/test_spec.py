"""The model spec and image pre-processing, without a server."""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models import images
from models.images import ImageError
from models.signature import Signature
from models.spec import ImageInput, ModelSpec, SpecError, TensorInput, load, parse

pytestmark = pytest.mark.unit

IMAGE_SPEC: dict[str, Any] = {
    "input": {"kind": "image", "width": 8, "height": 6, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3},
    "classes": ["circle", "square", "triangle"],
    "onnx_input": "image",
    "onnx_output": "logits",
    "trainer": "models.trainers:small_cnn",
}


def encoded(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_yaml_and_toml_specs_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "input:\n  kind: image\n  width: 8\n  height: 6\n  mean: [0.5, 0.5, 0.5]\n  std: [0.25, 0.25, 0.25]\n"
        "classes: [circle, square, triangle]\nonnx_input: image\ntrainer: models.trainers:small_cnn\n"
    )
    (tmp_path / "m.toml").write_text(
        'classes = ["circle", "square", "triangle"]\nonnx_input = "image"\ntrainer = "models.trainers:small_cnn"\n'
        '[input]\nkind = "image"\nwidth = 8\nheight = 6\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n'
    )
    assert load(tmp_path / "m.yaml") == load(tmp_path / "m.toml") == parse(IMAGE_SPEC)


def test_an_image_spec_derives_the_tensor_signature() -> None:
    spec = parse(IMAGE_SPEC)
    assert spec.signature() == Signature(
        input_shape=(3, 6, 8), class_names=("circle", "square", "triangle"), min_value=-2.0, max_value=2.0,
        input_name="image", output_name="logits",
    )  # fmt: skip
    nhwc = parse({**IMAGE_SPEC, "input": {**IMAGE_SPEC["input"], "layout": "NHWC", "mode": "L", "mean": [0],
                                          "std": [1]}})  # fmt: skip
    assert nhwc.signature().input_shape == (6, 8, 1)
    assert (nhwc.signature().min_value, nhwc.signature().max_value) == (0.0, 1.0)


def test_a_tensor_spec_round_trips_through_a_signature() -> None:
    spec = ModelSpec(input=TensorInput(shape=(8, 8), min_value=0, max_value=16), classes=tuple("0123456789"))
    assert ModelSpec.of_signature(spec.signature()) == spec
    assert parse(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"classes": ["a"]}, "classes: Tuple should have at least 2 items"),
        ({"classes": ["a", "b", "a"]}, "repeated: a"),
        ({"classes": ["a", "b\x00"]}, "classes.1"),
        ({"trainer": "not an entry point"}, "trainer: String should match pattern"),
        ({"input": {**IMAGE_SPEC["input"], "mode": "CMYK"}}, "input.image.mode"),
        ({"input": {**IMAGE_SPEC["input"], "mean": [0.5, 0.5]}}, "mean has 2 values; mode RGB needs 1 or 3"),
        ({"input": {**IMAGE_SPEC["input"], "std": [0.0]}}, "std values must be positive"),
        ({"input": {**IMAGE_SPEC["input"], "width": 0}}, "input.image.width"),
        ({"input": {"kind": "tensor", "shape": [8, 8], "min_value": 1, "max_value": 1}}, "must be below max_value"),
        ({"input": {"kind": "audio"}}, "input: Input tag 'audio' found using 'kind' does not match"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_an_invalid_spec_is_refused_naming_the_field(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse({**IMAGE_SPEC, **change})
    assert fragment in str(info.value)


def test_unreadable_spec_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "bad.toml").write_text("classes = [")
    with pytest.raises(SpecError, match="not valid TOML"):
        load(tmp_path / "bad.toml")


def rgb(width: int, height: int) -> Image.Image:
    pixels = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    return Image.fromarray(pixels, "RGB")


def test_preprocessing_normalises_and_lays_out_as_the_spec_says() -> None:
    spec = parse(IMAGE_SPEC).input
    assert isinstance(spec, ImageInput)
    picture = rgb(8, 6)
    tensor = images.preprocess(encoded(picture), spec)
    assert tensor.shape == (3, 6, 8) and tensor.dtype == np.float32
    expected = (np.asarray(picture, np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(tensor, expected.transpose(2, 0, 1), rtol=1e-6)
    grey = images.preprocess(encoded(picture), spec.model_copy(update={"mode": "L", "mean": (0.0,), "std": (1.0,),
                                                                        "layout": "NHWC"}))  # fmt: skip
    assert grey.shape == (6, 8, 1) and grey.min() >= 0 and grey.max() <= 1


@pytest.mark.parametrize("rule", ["stretch", "fit", "crop"])
def test_every_resize_rule_gives_the_spec_size(rule: str) -> None:
    spec = ImageInput(width=8, height=6, resize=rule)
    for size in ((32, 6), (8, 40), (3, 3)):
        assert images.preprocess(encoded(rgb(*size)), spec).shape == (3, 6, 8)


def test_fit_pads_with_black_and_crop_cuts_the_centre_out() -> None:
    white = encoded(Image.new("RGB", (32, 8), "white"))  # wide: 4 times as wide as high
    fitted = images.preprocess(white, ImageInput(width=8, height=6, resize="fit"))
    assert (fitted[:, 0, :] == 0).all() and (fitted[:, 3, :] == 1).all()  # black bands above, white middle
    cropped = images.preprocess(white, ImageInput(width=8, height=6, resize="crop"))
    assert (cropped == 1).all()


def test_jpeg_and_webp_decode_and_their_media_type_is_known() -> None:
    spec = ImageInput(width=8, height=6)
    for fmt, media_type in (("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("PNG", "image/png")):
        assert images.decode(encoded(rgb(8, 6), fmt), spec).media_type == media_type


def _noise_png() -> bytes:
    """900 pixels of noise: a PNG whose compressed pixels are long enough to cut in half."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels, "RGB"))


def _bomb() -> bytes:
    """A PNG whose header declares 100,000 x 100,000 pixels: tiny on the wire, 30 GB decoded."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR's width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC, over its type and data
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"not an image at all", "not an image in an accepted format"),
        (_noise_png()[:400], "truncated or corrupt"),
        (encoded(rgb(8, 6), "GIF"), "not an image in an accepted format"),
        (encoded(rgb(8, 6), "WEBP"), "webp images are not accepted; send png"),
        (encoded(rgb(64, 64)), "64x64 = 4096 pixels, over the limit of 1000"),
        (_bomb(), "pixels"),
    ],
)
def test_bad_images_are_refused_naming_the_problem(data: bytes, fragment: str) -> None:
    spec = ImageInput(width=8, height=6, formats=("png",), max_pixels=1000)
    with pytest.raises(ImageError) as info:
        images.preprocess(data, spec)
    assert fragment in str(info.value)


def test_numeric_class_names_in_yaml_become_names_and_booleans_are_refused() -> None:
    import yaml

    head = "input: {kind: tensor, shape: [4], min_value: 0, max_value: 1}\nclasses: "
    assert parse(yaml.safe_load(head + "[0, 180]")).classes == ("0", "180")
    assert parse(yaml.safe_load(head + "[90, left]")).signature().class_names == ("90", "left")
    with pytest.raises(SpecError, match="classes"):
        parse(yaml.safe_load(head + "[true, false]"))
    with pytest.raises(SpecError, match="repeated: 0"):
        parse(yaml.safe_load(head + "[0, '0']"))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"resize": "shorter-side-crop"}, "resize shorter-side-crop needs shorter_side"),
        ({"resize": "shorter-side-crop", "shorter_side": 7}, "shorter_side 7 must be at least the crop's larger"),
        ({"resize": "fit", "shorter_side": 9}, "shorter_side is only read by resize shorter-side-crop, not fit"),
        ({"mode": "L", "mean": [0.5], "std": [0.25], "channel_order": "BGR"}, "channel_order BGR needs mode RGB"),
        ({"pad_value": [256]}, "pad_value in pixels is an 8-bit value (0 to 255), got [256.0]"),
        ({"pad_value": [0, -1, 0]}, "pad_value in pixels is an 8-bit value"),
        ({"interpolation": "bicubic"}, "input.image.interpolation"),
    ],
)  # fmt: skip
def test_invalid_preprocessing_options_are_refused(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse({**IMAGE_SPEC, "input": {**IMAGE_SPEC["input"], **change}})
    assert fragment in str(info.value)
    if "pad_value" in change:  # the same values are fine as values of the normalised tensor
        parse({**IMAGE_SPEC, "input": {**IMAGE_SPEC["input"], **change, "pad_units": "normalised"}})
