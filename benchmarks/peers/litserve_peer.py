"""The same model behind LitServe (dynamic batching up to 64, 5 ms wait), no logging.

LOOP_MODEL_TAG=digits-cnn:latest python -m benchmarks.peers.litserve_peer --port 3995
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import litserve as ls
import numpy as np
from numpy.typing import NDArray

from models import store
from models.runtime import DevicePreference, OnnxModel
from models.signature import postprocess


class DigitsAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        # A benchmark peer, not part of the product: it reads its one knob directly.
        stored = store.get(os.environ.get("LOOP_MODEL_TAG", "digits-cnn:latest"))
        self.model = OnnxModel(stored.onnx_path, device=DevicePreference.CPU)

    # No annotation on `request`: LitServe reads an unannotated argument as the JSON body.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return np.asarray(request["samples"][0], dtype=np.float32)

    def batch(self, inputs: list[NDArray[np.float32]]) -> NDArray[np.float32]:
        return np.stack(inputs)

    def predict(self, x: NDArray[np.float32]) -> list[dict[str, Any]]:
        out = postprocess(self.model.run(x))
        return [
            {"label": int(label), "confidence": float(confidence)}
            for label, confidence in zip(out.labels, out.confidences, strict=True)
        ]

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3995)
    args = parser.parse_args()
    api = DigitsAPI(max_batch_size=64, batch_timeout=0.005)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, healthcheck_path="/readyz").run(
        port=args.port,
        generate_client_file=False,  # it would write a client.py into the working folder
    )


if __name__ == "__main__":
    main()
