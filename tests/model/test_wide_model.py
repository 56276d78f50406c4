"""The benchmark's compute-bound model: exported, parity-checked and served like any other."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from models import digits
from models.pipeline import build_wide_model
from models.runtime import DevicePreference, OnnxModel

pytestmark = pytest.mark.model


def test_wide_model_is_stored_with_the_digits_signature_and_runs_any_batch() -> None:
    stored = build_wide_model(name=f"wide-{uuid.uuid4().hex[:8]}", seed=3)
    assert stored.card.signature == digits.digits_signature()
    assert stored.card.parity_max_abs_diff < 1e-4
    runtime = OnnxModel(stored.onnx_path, device=DevicePreference.CPU)
    for batch in (1, 7, 64):
        x = np.random.default_rng(batch).uniform(0, 16, size=(batch, 8, 8)).astype(np.float32)
        logits = runtime.run(x)
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()
    again = build_wide_model(name=f"wide-{uuid.uuid4().hex[:8]}", seed=3)
    x = np.ones((2, 8, 8), np.float32)
    np.testing.assert_allclose(
        OnnxModel(again.onnx_path, device=DevicePreference.CPU).run(x), runtime.run(x), rtol=1e-5
    )
