"""The BentoML inference service: `POST /predict`, `GET /models`, and BentoML's probes and metrics."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Annotated, Any

import bentoml
import numpy as np
from fastapi import FastAPI
from numpy.typing import NDArray
from pydantic import Field, ValidationError
from starlette.responses import JSONResponse

from feedback.ids import uuid7
from models import store
from models.runtime import OnnxModel
from models.signature import InputError, postprocess, to_batch
from service import metrics
from service.batching import AdaptiveBatcher, BatcherClosed, Overloaded
from service.schemas import (
    EXAMPLE_DIGIT,
    BatchingPublic,
    ModelPublic,
    PredictionPublic,
    PredictResponse,
    SignaturePublic,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class Served:
    """A loaded model: what the store says about it and the session that runs it."""

    stored: store.StoredModel
    runtime: OnnxModel


class _QuietClientErrors(logging.Filter):
    """Bad request bodies are the client's error: log them in one line, without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ValidationError):
            record.msg = f"{record.getMessage()}: invalid request body"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _error(status: int, message: str) -> Any:
    return JSONResponse({"error": message}, status_code=status)


@bentoml.service(name="loop", traffic={"timeout": 30})
@bentoml.asgi_app(routes, path="/")
class Predictor:
    """Serves one model from the BentoML store with adaptive batching."""

    def __init__(self) -> None:
        self.settings = Settings()
        logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())
        self._served: Served | None = None
        self._load_error: str | None = None
        self._batcher: AdaptiveBatcher[Served] | None = None
        # Loading runs beside the server so that /livez answers at once and /readyz tells the truth.
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            stored = store.get(self.settings.model_ref)
            runtime = OnnxModel(
                stored.onnx_path, device=self.settings.device, intra_op_threads=self.settings.ort_threads
            )
        except Exception as exc:
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("could not load model %s", self.settings.model_ref)
            return
        self._served = Served(stored=stored, runtime=runtime)
        metrics.model_info.labels(
            model_name=stored.name, model_version=stored.version, provider=runtime.provider
        ).set(1)
        logger.info("serving %s on %s", stored.tag, runtime.provider)

    def __is_ready__(self) -> bool:
        return self._served is not None

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()

    def _infer(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float32], Served]:
        served = self._served
        assert served is not None  # requests only reach the batcher once a model is loaded
        return served.runtime.run(batch), served

    def _on_batch(self, size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.inference_seconds.observe(seconds)

    @bentoml.api(route="/predict")
    async def predict(
        self,
        samples: Annotated[
            list[Any],
            Field(
                description="Samples to classify, each of the served model's input shape "
                "(8x8 pixel intensities in [0, 16] for the default digits model).",
                examples=[[EXAMPLE_DIGIT]],
            ),
        ],
    ) -> PredictResponse:
        """Classify one or many samples; every answer carries its prediction id."""
        served = self._served
        if served is None:
            reason = self._load_error or "the model is still loading"
            return _error(503, f"not ready: {reason}")
        signature = served.stored.card.signature
        try:
            batch = to_batch(samples, signature, max_samples=self.settings.max_samples_per_request)
        except InputError as exc:
            return _error(400, str(exc))
        if self._batcher is None:
            self._batcher = AdaptiveBatcher(
                self._infer,
                max_batch_size=self.settings.max_batch_size,
                max_latency_s=self.settings.max_latency_ms / 1000,
                on_batch=self._on_batch,
            )
        try:
            logits, used = await self._batcher.submit(batch)
        except (Overloaded, BatcherClosed) as exc:
            return _error(503, str(exc))
        out = postprocess(logits)
        names = used.stored.card.signature.class_names
        predictions = [
            PredictionPublic(
                id=uuid7(),
                label=names[label],
                confidence=float(confidence),
                scores=dict(zip(names, map(float, probabilities), strict=True)),
                model_name=used.stored.name,
                model_version=used.stored.version,
            )
            for label, confidence, probabilities in zip(
                out.labels, out.confidences, out.probabilities, strict=True
            )
        ]
        metrics.predictions.labels(model_name=used.stored.name, model_version=used.stored.version).inc(
            len(predictions)
        )
        return PredictResponse(predictions=predictions)

    @routes.get("/models", response_model=ModelPublic, responses={503: {"description": "No model loaded"}})
    def models(self) -> Any:
        """Which model, version, provider and signature this worker serves."""
        served = self._served
        if served is None:
            return _error(503, f"not ready: {self._load_error or 'the model is still loading'}")
        card = served.stored.card
        return ModelPublic(
            name=served.stored.name,
            version=served.stored.version,
            provider=served.runtime.provider,
            providers=served.runtime.providers,
            fallback_reason=served.runtime.fallback_reason,
            signature=SignaturePublic(**card.signature.to_dict()),
            metrics=card.metrics,
            dataset_id=card.dataset_id,
            validation_id=card.validation_id,
            onnx_opset=card.opset,
            code_version=card.code_version,
            batching=BatchingPublic(
                max_batch_size=self.settings.max_batch_size,
                max_latency_ms=self.settings.max_latency_ms,
                max_samples_per_request=self.settings.max_samples_per_request,
            ),
        )
