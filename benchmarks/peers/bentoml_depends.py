"""BentoML's own way to batch across API workers: an API service with two workers that reaches a
batchable inference service (one worker) through `bentoml.depends`. A benchmark prototype, beside
our shared inference process (`LOOP_INFERENCE=shared`); no logging. Serves the same model.

    LOOP_MODEL_TAG=digits-wide:latest bentoml serve benchmarks.peers.bentoml_depends:DependsApi
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

# A benchmark peer, not part of the product: it reads its knobs directly.
API_WORKERS = int(os.environ.get("DEPENDS_API_WORKERS", "2"))
ORT_THREADS = int(os.environ.get("DEPENDS_ORT_THREADS", "1"))


@bentoml.service(name="depends-inference", workers=1)
class DependsInference:
    def __init__(self) -> None:
        stored = store.get(os.environ.get("LOOP_MODEL_TAG", "digits-cnn:latest"))
        self.model = OnnxModel(stored.onnx_path, device=DevicePreference.AUTO, intra_op_threads=ORT_THREADS)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=256, max_latency_ms=1000)
    def run(self, samples: NDArray[np.float32]) -> NDArray[np.float32]:
        return self.model.run(np.ascontiguousarray(samples, dtype=np.float32))


@bentoml.service(name="depends-api", workers=API_WORKERS)
class DependsApi:
    inference = bentoml.depends(DependsInference)

    @bentoml.api
    async def predict(self, samples: NDArray[np.float32]) -> list[dict[str, Any]]:
        out = postprocess(await self.inference.to_async.run(samples))
        return [
            {"label": int(label), "confidence": float(confidence)}
            for label, confidence in zip(out.labels, out.confidences, strict=True)
        ]
