"""A bare BentoML service with BentoML's own adaptive batching (`batchable=True`) and no logging:
the baseline our service is compared with. Serves the same model from the same store.

    LOOP_MODEL_TAG=digits-cnn:latest bentoml serve benchmarks.peers.bentoml_batchable:BareBatchable
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np
from numpy.typing import NDArray

from models import store
from models.runtime import DevicePreference, OnnxModel
from models.signature import postprocess


@bentoml.service(name="bare-batchable")
class BareBatchable:
    def __init__(self) -> None:
        # A benchmark peer, not part of the product: it reads its one knob directly.
        stored = store.get(os.environ.get("LOOP_MODEL_TAG", "digits-cnn:latest"))
        self.model = OnnxModel(stored.onnx_path, device=DevicePreference.AUTO)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=1000)
    def predict(self, samples: NDArray[np.float32]) -> list[dict[str, Any]]:
        out = postprocess(self.model.run(np.ascontiguousarray(samples, dtype=np.float32)))
        return [
            {"label": int(label), "confidence": float(confidence)}
            for label, confidence in zip(out.labels, out.confidences, strict=True)
        ]
