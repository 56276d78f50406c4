"""Every stored model carries a reference (inputs and their CPU scores), run again when a worker loads it."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from feedback.keys import Keys
from models import store
from models.pipeline import BuildResult
from models.runtime import DevicePreference, OnnxModel, check_reference
from service.serving import ModelSlot, ReferenceMismatch, Where

pytestmark = pytest.mark.model


def where(tolerance: float = 1e-3) -> Where:
    return Where(database_url=None, redis_url=None, keys=Keys("reference-test"), device=DevicePreference.AUTO,
                 ort_threads=1, max_batch_size=8, max_latency_s=0.001, reference_tolerance=tolerance)  # fmt: skip


def test_a_stored_model_matches_its_reference_and_a_drifted_one_is_refused(trained_model: BuildResult) -> None:
    stored = trained_model.stored
    assert stored.reference_path is not None
    with np.load(stored.reference_path) as saved:
        inputs, outputs = saved["inputs"], saved["outputs"]
    assert inputs.shape == (16, 8, 8) and outputs.shape == (16, 10)
    check = check_reference(OnnxModel(stored.onnx_path, device=DevicePreference.CPU), stored.reference_path, 1e-3)
    assert check.passed and check.max_abs_diff < 1e-6 and check.samples == 16

    name = f"drift-{uuid.uuid4().hex[:8]}"
    copy = store.save(name, stored.onnx_path, stored.card)
    slot = ModelSlot(name, copy.version, where())
    assert slot.swap(copy.tag) and slot.served is not None and slot.served.reference is not None
    assert slot.served.reference.passed

    assert copy.reference_path is not None
    np.savez(copy.reference_path, inputs=inputs, outputs=outputs[:, ::-1].copy())  # other answers than the graph's
    fresh = ModelSlot(name, copy.version, where())
    with pytest.raises(ReferenceMismatch, match=r"differ from its stored reference by .* \(tolerance 1e-03\); refused"):
        fresh.swap(copy.tag)
    assert fresh.served is None
