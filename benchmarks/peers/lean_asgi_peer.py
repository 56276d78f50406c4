"""A prototype of our prediction path without BentoML and Starlette: a bare ASGI callable on uvicorn
(httptools, no access log) that does what `POST /predict` does with logging on (parse, check the
samples against the model's signature, batch adaptively, infer, log every prediction to the Redis
stream before answering) and nothing else. It measures what a front end of our own would reach on
the same machine, so that the design can be weighed against BentoML's server; it is not the product.

    LOOP_MODEL_TAG=digits-cnn:latest LOOP_REDIS_URL=redis://127.0.0.1:6379/0 LOOP_REDIS_PREFIX=bench \\
        python -m benchmarks.peers.lean_asgi_peer --port 3997 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.predictions.log import PredictionLog
from feedback.predictions.records import PredictionRecord
from models import store
from models.runtime import DevicePreference, OnnxModel
from models.signature import InputError, postprocess, to_batch
from service.batching import AdaptiveBatcher

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_BODY = 4 * 2**20
# A benchmark peer, not part of the product: it reads its knobs directly.
_STORED = store.get(os.environ.get("LOOP_MODEL_TAG", "digits-cnn:latest"))
_MODEL = OnnxModel(_STORED.onnx_path, device=DevicePreference.CPU)
_SIGNATURE = _STORED.card.signature
_NAMES = _SIGNATURE.class_names


class _State:
    batcher: AdaptiveBatcher[None] | None = None
    log: PredictionLog | None = None


def _started() -> tuple[AdaptiveBatcher[None], PredictionLog | None]:
    """Created inside the worker's event loop on the first request."""
    if _State.batcher is None:
        _State.batcher = AdaptiveBatcher(lambda b: (_MODEL.run(b), None), max_batch_size=64, max_latency_s=1.0)
        redis_url = os.environ.get("LOOP_REDIS_URL")
        if redis_url:
            _State.log = PredictionLog(
                redis_url,
                keys=Keys(os.environ.get("LOOP_REDIS_PREFIX", "lean")),
                spool_dir=Path(tempfile.mkdtemp(prefix="lean-spool-")),
                writer=f"lean-{os.getpid()}",
            )
    return _State.batcher, _State.log


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/readyz":
        await _answer(send, 200, b"{}")
        return
    if scope["path"] != "/predict" or scope["method"] != "POST":
        await _answer(send, 404, b'{"detail":"not found"}')
        return
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            await _answer(send, 413, b'{"detail":"body too large"}')
            return
        chunks.append(chunk)
        more = message.get("more_body", False)
    try:
        samples = orjson.loads(b"".join(chunks))["samples"]
        batch = to_batch(samples, _SIGNATURE, max_samples=256)
    except (orjson.JSONDecodeError, KeyError, TypeError, InputError) as exc:
        await _answer(send, 422, orjson.dumps({"detail": str(exc)}))
        return
    batcher, log = _started()
    logits, _ = await batcher.submit(batch)
    out = postprocess(logits)
    ids, request_id = [uuid7() for _ in range(len(batch))], uuid.uuid4().hex
    if log is not None:
        await log.append(
            [
                PredictionRecord(
                    id=ids[i],
                    model_name=_STORED.name,
                    model_version=_STORED.version,
                    input=batch[i],
                    scores=out.probabilities[i],
                    label=_NAMES[out.labels[i]],
                    confidence=float(out.confidences[i]),
                    request_id=request_id,
                )
                for i in range(len(batch))
            ]
        )
    predictions = [
        {"id": str(ids[i]), "label": _NAMES[out.labels[i]], "confidence": float(out.confidences[i])}
        for i in range(len(batch))
    ]
    await _answer(send, 200, orjson.dumps({"request_id": request_id, "predictions": predictions}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3997)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    target = "benchmarks.peers.lean_asgi_peer:app"
    uvicorn.run(
        target,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        workers=args.workers,
        http="httptools",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
