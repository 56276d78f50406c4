"""The statistics of live model health on hand-made numbers: input features of tensors and images,
sketches that add, the homogeneity test's level and power, the calibrated estimate and the judged
accuracy's interval."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models import health
from models.spec import ImageInput, TensorInput


def png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_image_features_are_size_brightness_per_channel_and_contrast() -> None:
    spec = ImageInput(width=16, height=16)
    half = Image.new("RGB", (4, 2), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 4, 1))  # the top row white: grey levels 0 and 255, half each
    out = io.BytesIO()
    half.save(out, format="PNG")
    features = health.input_features(spec, [png((10, 20, 30), (7, 5)), out.getvalue(), b"not an image"])
    assert health.feature_names(spec) == list(health.IMAGE_FEATURES)
    np.testing.assert_allclose(features[0], [7, 5, 10, 20, 30, 0], atol=1e-9)
    np.testing.assert_allclose(features[1], [4, 2, 127.5, 127.5, 127.5, 127.5], atol=1e-9)
    assert np.isnan(features[2]).all()  # counted nowhere


def test_tensor_features_are_the_values_or_the_means_of_64_runs() -> None:
    small = TensorInput(shape=(2, 3), min_value=0, max_value=1)
    batch = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    np.testing.assert_array_equal(health.tensor_features(batch), batch.reshape(2, 6))
    assert health.feature_names(small)[4] == "[1, 1]"
    large = TensorInput(shape=(128,), min_value=0, max_value=1)
    values = np.arange(256, dtype=np.float32).reshape(2, 128)
    features = health.tensor_features(values)
    assert features.shape == (2, 64) and features[0, 0] == 0.5 and features[1, 63] == 254.5
    assert health.feature_names(large)[0] == "mean of values 0 to 1"


def test_sketches_add_and_a_drifted_window_is_told_from_an_undrifted_one() -> None:
    rng = np.random.default_rng(0)

    def window(n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.normal(shift, 1, (n, 2))
        p = np.clip(0.6 + 0.1 * rng.standard_normal(n), 0, 1)
        return (x[:, 0] > 0).astype(np.int64), np.maximum(p, 1 - p), x

    labels, confidence, x = window(2000)
    probabilities = np.stack([1 - confidence, confidence], axis=1)  # the answered label's is the larger
    probabilities[labels == 0] = probabilities[labels == 0][:, ::-1]
    reference = health.Reference.of(probabilities, labels, x, ["a", "b"])
    a, b = (reference.sketch(*window(300)) for _ in range(2))
    both = a + b
    assert both.count == 600 and (both.labels == a.labels + b.labels).all()
    assert [(f == fa + fb).all() for f, fa, fb in zip(both.features, a.features, b.features, strict=True)] == [
        True,
        True,
    ]
    assert health.Sketch.from_dict(both.to_dict()).to_dict() == both.to_dict()
    alarms = [
        s.kind
        for _ in range(50)
        for s in health.shifts(reference, reference.sketch(*window(300)), alpha=0.01)
        if s.alarm
    ]
    assert len(alarms) <= 3  # 3 kinds at 1% over 50 windows: 1.5 expected
    drifted = {s.kind: s for s in health.shifts(reference, reference.sketch(*window(300, shift=0.5)), alpha=0.01)}
    assert drifted["inputs"].alarm and drifted["inputs"].psi > 0.1 and drifted["labels"].alarm


def test_the_estimate_follows_the_calibration_and_the_judged_interval_is_wilsons() -> None:
    # A reference right 90% of the time at confidence 0.9..0.95, 50% at 0.5..0.55.
    confidence = np.array([0.92] * 100 + [0.52] * 100)
    truth = np.zeros(200, dtype=np.int64)
    truth[90:100] = 1
    truth[150:200] = 1
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    reference = health.Reference.of(probabilities, truth, np.zeros((200, 0)), [])
    sure = reference.sketch(np.zeros(100), np.full(100, 0.92), np.zeros((100, 0)))
    unsure = reference.sketch(np.zeros(100), np.full(100, 0.52), np.zeros((100, 0)))
    high, low = health.estimated_accuracy(reference, sure), health.estimated_accuracy(reference, unsure)
    assert high is not None and low is not None
    assert high.value == pytest.approx((90 + 2 * 0.925) / 102) and low.value == pytest.approx((50 + 2 * 0.525) / 102)
    assert high.low < high.value < high.high and high.high - high.low < 0.2
    judged = health.judged_accuracy(8, 2)
    assert judged is not None and judged.value == 0.8
    assert judged.low == pytest.approx(0.4902, abs=1e-4) and judged.high == pytest.approx(0.9433, abs=1e-4)
    assert health.judged_accuracy(0, 0) is None
    assert health.disagree(high, health.judged_accuracy(10, 90)) and not health.disagree(
        high, health.judged_accuracy(89, 11)
    )
