"""The same model behind plain FastAPI and uvicorn, no batching and no logging: the cheapest
Python server, each request run by itself as it comes.

    LOOP_MODEL_TAG=digits-cnn:latest python -m benchmarks.peers.fastapi_peer --port 3996
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

from models import store
from models.runtime import DevicePreference, OnnxModel
from models.signature import postprocess

# A benchmark peer, not part of the product: it reads its one knob directly.
_MODEL = OnnxModel(
    store.get(os.environ.get("LOOP_MODEL_TAG", "digits-cnn:latest")).onnx_path, device=DevicePreference.CPU
)
app = FastAPI()


class Body(BaseModel):
    samples: list[Any]


@app.get("/readyz")
def ready() -> Response:
    return Response(status_code=200)


@app.post("/predict")
def predict(body: Body) -> list[dict[str, Any]]:
    # A plain (sync) route: FastAPI runs it in its thread pool, one request per model call.
    out = postprocess(_MODEL.run(np.asarray(body.samples, dtype=np.float32)))
    return [
        {"label": int(label), "confidence": float(confidence)}
        for label, confidence in zip(out.labels, out.confidences, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3996)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    target = app if args.workers == 1 else f"{__name__.replace('__main__', 'benchmarks.peers.fastapi_peer')}:app"
    uvicorn.run(target, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, workers=args.workers)


if __name__ == "__main__":
    main()
