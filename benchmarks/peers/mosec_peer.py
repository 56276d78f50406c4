"""The same model behind MOSEC (Rust HTTP front, batches up to 64, 5 ms wait), no logging.

    LOOP_MODEL_TAG=digits-cnn:latest python -m benchmarks.peers.mosec_peer --port 3996

MOSEC serves `POST /inference`; its `GET /` answers once it is up.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from mosec import Server, Worker

from models import store
from models.runtime import DevicePreference, OnnxModel
from models.signature import postprocess


class Digits(Worker):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        # A benchmark peer, not part of the product: it reads its one knob directly.
        stored = store.get(os.environ.get("LOOP_MODEL_TAG", "digits-cnn:latest"))
        self.model = OnnxModel(stored.onnx_path, device=DevicePreference.CPU)

    def forward(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        x = np.asarray([d["samples"][0] for d in data], dtype=np.float32)
        out = postprocess(self.model.run(x))
        return [
            {"label": int(label), "confidence": float(confidence)}
            for label, confidence in zip(out.labels, out.confidences, strict=True)
        ]


if __name__ == "__main__":
    server = Server()
    server.append_worker(Digits, num=1, max_batch_size=64, max_wait_time=5)
    server.run()
