"""The BentoML inference service: `POST /predict`, `GET /models`, `GET /predictions/{id}`, and
BentoML's probes and metrics."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, cast

import bentoml
import numpy as np
import psycopg
import redis
from fastapi import FastAPI
from numpy.typing import NDArray
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from pydantic import AfterValidator, Field, StringConstraints, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from feedback import dataset_store, dead_letters, ingest
from feedback.admin_routes import DataLoopContext
from feedback.admin_routes import router as admin_router
from feedback.champion import announce
from feedback.datasets import LabelSchema, digits_originals
from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.prediction_log import Event, LogPolicy, LogUnavailable, PredictionLog
from feedback.records import PredictionRecord, npy_load, unstorable_text
from feedback.routes import ModerationContext
from feedback.routes import router as review_router
from feedback.store import StoredPrediction, fetch_prediction
from models import store
from models.digits import digits_signature
from models.runtime import OnnxModel
from models.signature import InputError, postprocess, read_npy, to_batch
from service import metrics
from service.batching import AdaptiveBatcher, BatcherClosed, Overloaded
from service.limits import RequestLimits, use_bounded_heads
from service.schemas import (
    EXAMPLE_DIGIT,
    BatchingPublic,
    ModelPublic,
    PredictionPublic,
    PredictResponse,
    SignaturePublic,
    StoredPredictionPublic,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

STARTUP_WAIT_S = 10.0  # how long a request waits for the worker's first model load before a 503
CHAMPION_CHECK_S = 30.0  # how often a worker asks who the champion is, besides listening for promotions

routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
routes.include_router(review_router)
routes.include_router(admin_router)


def _storable(text: str) -> str:
    problem = unstorable_text(text)
    if problem is not None:
        raise ValueError(f"the tag {problem}")
    return text


TagKey = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_storable)]
TagValue = Annotated[str, StringConstraints(max_length=256), AfterValidator(_storable)]
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


@dataclass(frozen=True)
class Refusal:
    """A request not answered with predictions: the status and why."""

    status: int
    message: str


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


def _log_to_stderr(*names: str) -> None:
    """BentoML configures only its own loggers: ours (swaps, fallbacks, spool replays) must show too."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
    for name in names:
        named = logging.getLogger(name)
        if not named.handlers:
            named.addHandler(handler)
            named.setLevel(logging.INFO)
            named.propagate = False


def _error(status: int, message: str, ctx: bentoml.Context | None = None) -> Any:
    if ctx is not None:  # BentoML applies the context's status code over the response's
        ctx.response.status_code = status
    return JSONResponse({"error": message}, status_code=status)


def _count_log_event(event: Event, n: int) -> None:
    metrics.log_records.labels(event=event.value).inc(n)


@bentoml.service(name="loop", traffic={"timeout": 30})
@bentoml.asgi_app(routes, path="/")
class Predictor:
    """Serves one model from the BentoML store with adaptive batching; logs every prediction."""

    def __init__(self) -> None:
        self.settings = Settings()
        logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())
        _log_to_stderr("service", "feedback", "models")
        self.keys = Keys(self.settings.redis_prefix)
        self._served: Served | None = None
        self._load_error: str | None = None
        self._batcher: AdaptiveBatcher[Served] | None = None
        self._log: PredictionLog | None = None
        self._log_error: str | None = None
        self._pool: AsyncConnectionPool | None = None
        self._review_pool: ConnectionPool | None = None
        self._background: list[asyncio.Task[None]] = []
        if self.settings.log_predictions and self.settings.redis_url is None:
            self._log_error = "LOOP_REDIS_URL is not set (`loop serve` starts an embedded Redis)"
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self._swap_lock = threading.Lock()
        self._loaded = threading.Event()
        # Loading runs beside the server so that /livez answers at once and /readyz tells the truth.
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        ref = self._resolve()
        try:
            self._swap(ref)
        except Exception as exc:
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("could not load model %s", ref)
        finally:
            self._loaded.set()

    def _resolve(self) -> str:
        """The store reference to serve: the champion (Postgres, else Redis) when following it."""
        settings = self.settings
        if not settings.follows_champion:
            return settings.model_ref
        version = None
        if settings.database_url is not None:
            try:
                with psycopg.connect(settings.database_url, connect_timeout=3) as conn:
                    found = dataset_store.champion(conn=conn, model_name=settings.model_name)
                version = found.model_version if found is not None else None
            except psycopg.Error as exc:
                logger.warning("champion not read from Postgres: %s", exc)
        if version is None and settings.redis_url is not None:
            try:
                client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
                with client:
                    raw = client.get(self.keys.champion(settings.model_name))
                version = raw.decode() if isinstance(raw, bytes) else None
            except redis.RedisError as exc:
                logger.warning("champion not read from Redis: %s", exc)
        return f"{settings.model_name}:{version}" if version else settings.model_ref

    def _swap(self, ref: str) -> bool:
        """Load `ref` and serve it from the next batch on; batches in flight finish on the old session."""
        with self._swap_lock:
            current = self._served
            stored = store.get(ref)
            if current is not None and (current.stored.name, current.stored.version) == (stored.name, stored.version):
                return False
            runtime = OnnxModel(
                stored.onnx_path, device=self.settings.device, intra_op_threads=self.settings.ort_threads
            )
            self._served = Served(stored=stored, runtime=runtime)
            self._load_error = None
        for served, value in ((current, 0), (self._served, 1)):
            if served is not None:
                info = {"model_name": served.stored.name, "model_version": served.stored.version}
                metrics.model_info.labels(**info, provider=served.runtime.provider).set(value)
        if current is None:
            logger.info("serving %s on %s", stored.tag, runtime.provider)
        else:
            logger.info("swapped %s for %s on %s", current.stored.tag, stored.tag, runtime.provider)
        return True

    async def _follow_champion(self, redis_url: str) -> None:
        """Swap to each new champion: at once on a promotion message, and on a periodic check that
        catches messages missed while disconnected."""
        import redis.asyncio as aioredis

        while True:
            client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.promotions)
                    await self._recheck()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=CHAMPION_CHECK_S)
                        if message is None:
                            await self._recheck()
                            continue
                        try:
                            announced = json.loads(message["data"])
                            name, version = announced["model_name"], announced["model_version"]
                        except (ValueError, KeyError, TypeError):
                            logger.warning("ignored a malformed promotion message: %r", message["data"])
                            continue
                        if name == self.settings.model_name:
                            await self._reload(f"{name}:{version}")
            except (redis.RedisError, OSError) as exc:
                logger.warning("promotion channel unavailable (%s); retrying", exc)
                await asyncio.sleep(2.0)
            finally:
                await client.aclose()

    async def _recheck(self) -> None:
        if self._served is not None:
            await self._reload(await asyncio.to_thread(self._resolve))

    async def _reload(self, ref: str) -> None:
        try:
            await asyncio.to_thread(self._swap, ref)
        except Exception:
            logger.exception("could not swap to %s; still serving the model loaded before", ref)

    @bentoml.on_startup
    async def startup(self) -> None:
        settings = self.settings
        # Everything imported so far lives as long as the worker: out of the collector's sight, a
        # full collection no longer walks the libraries' millions of objects while requests wait.
        gc.collect()
        gc.freeze()
        if settings.log_predictions and settings.redis_url is not None:
            self._log = PredictionLog(
                settings.redis_url,
                keys=self.keys,
                spool_dir=settings.spool_dir,
                writer=self.worker,
                policy=settings.log_policy,
                on_event=_count_log_event,
            )
            self._background.append(asyncio.create_task(self._log.run_replayer(), name="spool-replay"))
            self._background.append(asyncio.create_task(self._watch_stream(settings.redis_url)))
        if settings.follows_champion and settings.redis_url is not None:
            self._background.append(asyncio.create_task(self._follow_champion(settings.redis_url), name="champion"))
        if settings.database_url is not None:
            self._pool = AsyncConnectionPool(
                settings.database_url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
            )
            await self._pool.open(wait=False)  # serving must not wait for Postgres
            self._review_pool = ConnectionPool(
                settings.database_url, min_size=1, max_size=8, open=False, kwargs={"autocommit": True}
            )
            self._review_pool.open(wait=False)
            routes.state.moderation = ModerationContext(
                pool=self._review_pool,
                lease_seconds=settings.review_lease_seconds,
                overlap=settings.review_overlap,
                overlap_share=settings.review_overlap_share,
                labels=self._class_names,
                to_input=self._one_sample,
            )
            routes.state.data_loop = DataLoopContext(
                model_name=settings.model_name,
                schema=LabelSchema.of(digits_signature()),
                originals=lambda: digits_originals(settings.split_path),
                datasets_root=settings.datasets_root,
                announcer=self._announce if settings.redis_url is not None else None,
            )

    def _announce(self, model_name: str, version: str) -> None:
        assert self.settings.redis_url is not None
        with redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=2, socket_timeout=5) as client:
            announce(client, self.keys, model_name, version)

    async def _watch_stream(self, redis_url: str) -> None:
        """Keep the stream-lag and dead-letter gauges current."""
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            while True:
                try:
                    entries, seconds = await asyncio.to_thread(ingest.lag, client, self.keys)
                    metrics.stream_lag_entries.set(entries)
                    metrics.stream_lag_seconds.set(seconds)
                    metrics.dead_letters.set(await asyncio.to_thread(dead_letters.count, client, self.keys))
                except redis.RedisError:
                    pass
                await asyncio.sleep(2.0)
        finally:
            client.close()

    def __is_ready__(self) -> bool:
        if self._served is None:
            return False
        if not self.settings.log_predictions:
            return True
        if self._log is None:
            return False
        return self._log.redis_available or self.settings.log_policy is LogPolicy.SPOOL

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        for task in self._background:
            task.cancel()
        if self._log is not None:
            await self._log.close()
        if self._pool is not None:
            await self._pool.close()
        if self._review_pool is not None:
            self._review_pool.close()

    def _infer(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float32], Served]:
        served = self._served
        assert served is not None  # requests only reach the batcher once a model is loaded
        return served.runtime.run(batch), served

    def _on_batch(self, size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.inference_seconds.observe(seconds)

    def _class_names(self) -> tuple[str, ...] | None:
        served = self._served
        return None if served is None else served.stored.card.signature.class_names

    def _one_sample(self, sample: Any) -> NDArray[Any]:
        served = self._served
        if served is None:
            raise ValueError("no model is loaded yet")
        return to_batch([sample], served.stored.card.signature, max_samples=1)[0]

    def _not_ready(self) -> str | None:
        if self._served is None:
            return self._load_error or "the model is still loading"
        if self.settings.log_predictions and self._log is None:
            return self._log_error or "the prediction log is starting"
        return None

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
        tags: Annotated[
            dict[TagKey, TagValue] | None,
            Field(
                max_length=16,
                description="Client labels stored with each prediction.",
                examples=[{"app": "scanner"}],
            ),
        ] = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]  # BentoML passes the request context
    ) -> PredictResponse:
        """Classify one or many samples; every answer carries its prediction id and is stored."""
        request_id = _request_id(ctx)
        answer = await self._classify(samples, tags or {}, request_id)
        if isinstance(answer, Refusal):
            return _error(answer.status, answer.message, ctx)
        if ctx is not None:
            ctx.response.headers["X-Request-ID"] = request_id
            ctx.response.headers["X-Loop-Worker"] = self.worker
        return answer

    @routes.post(
        "/predict/npy",
        response_model=PredictResponse,
        responses={400: {"description": "Not an .npy array of samples"}, 503: {"description": "Not ready"}},
        openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}},
    )
    async def predict_npy(self, request: Request) -> Any:
        """Classify samples sent as one .npy array (N x input shape, or one sample): no JSON to parse."""
        request_id = _request_id_of(request.headers)
        body = await request.body()  # bounded by `RequestLimits` before it is read
        try:
            array = read_npy(body)
        except InputError as exc:
            return _error(400, str(exc))
        served = self._served
        if served is not None and array.shape == served.stored.card.signature.input_shape:
            array = array[np.newaxis]  # one sample
        answer = await self._classify(array, {}, request_id)
        if isinstance(answer, Refusal):
            return _error(answer.status, answer.message)
        headers = {"X-Request-ID": request_id, "X-Loop-Worker": self.worker}
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)

    async def _classify(self, samples: Any, tags: dict[str, str], request_id: str) -> PredictResponse | Refusal:
        if self._served is None and self._load_error is None:
            # Workers start one by one behind one port: a request that reaches one still loading
            # waits for it (briefly) rather than failing while its neighbours already answer.
            await asyncio.to_thread(self._loaded.wait, STARTUP_WAIT_S)
        reason = self._not_ready()
        if reason is not None:
            return Refusal(503, f"not ready: {reason}")
        served = self._served
        assert served is not None
        try:
            batch = to_batch(samples, served.stored.card.signature, max_samples=self.settings.max_samples_per_request)
        except InputError as exc:
            return Refusal(400, str(exc))
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
            return Refusal(503, str(exc))
        out = postprocess(logits)
        names = used.stored.card.signature.class_names
        ids = [uuid7() for _ in range(len(batch))]
        if self._log is not None:
            records = [
                PredictionRecord(
                    id=ids[i],
                    model_name=used.stored.name,
                    model_version=used.stored.version,
                    input=batch[i],
                    scores=out.probabilities[i],
                    label=names[out.labels[i]],
                    confidence=float(out.confidences[i]),
                    request_id=request_id,
                    tags=tags,
                )
                for i in range(len(batch))
            ]
            try:
                await self._log.append(records)  # before the answer leaves: what we answer is kept
            except LogUnavailable as exc:
                return Refusal(503, f"prediction not stored, so not answered: {exc}")
        predictions = [
            PredictionPublic(
                id=ids[i],
                label=names[out.labels[i]],
                confidence=float(out.confidences[i]),
                scores=dict(zip(names, out.probabilities[i].tolist(), strict=True)),
                model_name=used.stored.name,
                model_version=used.stored.version,
            )
            for i in range(len(batch))
        ]
        metrics.predictions.labels(model_name=used.stored.name, model_version=used.stored.version).inc(len(predictions))
        return PredictResponse(request_id=request_id, predictions=predictions)

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

    @routes.get(
        "/predictions/{prediction_id}",
        response_model=StoredPredictionPublic,
        responses={404: {"description": "Unknown id"}, 422: {"description": "Not a UUIDv7"}},
    )
    async def prediction(self, prediction_id: uuid.UUID) -> Any:
        """A stored prediction with its input: from Postgres, or from the stream if not yet ingested."""
        if prediction_id.version != 7:
            return _error(422, f"{prediction_id} is not a prediction id (UUIDv7)")
        if self._pool is None and self._log is None:
            return _error(503, "no prediction store is configured")
        failures = []
        if self._pool is not None:
            try:
                async with self._pool.connection(timeout=2) as conn:
                    row = await fetch_prediction(conn=conn, prediction_id=prediction_id)
                if row is not None:
                    return self._public(row, ingested=True)
            except (psycopg.OperationalError, TimeoutError) as exc:
                failures.append(f"Postgres: {exc}")
        if self._log is not None:
            try:
                record = await self._log.find(prediction_id)
            except redis.RedisError as exc:
                failures.append(f"Redis: {exc}")
            else:
                if record is not None:
                    return self._public(StoredPrediction.from_record(record), ingested=False)
        if failures:
            return _error(503, "could not look everywhere: " + "; ".join(failures))
        return _error(404, f"no prediction {prediction_id}")

    def _public(self, row: StoredPrediction, *, ingested: bool) -> StoredPredictionPublic:
        served = self._served
        scores: dict[str, float] | list[float] = list(row.scores)
        if served is not None and served.stored.name == row.model_name:
            names = served.stored.card.signature.class_names
            if len(names) == len(row.scores):
                scores = dict(zip(names, row.scores, strict=True))
        return StoredPredictionPublic(
            id=row.id,
            created_at=row.created_at,
            model_name=row.model_name,
            model_version=row.model_version,
            label=row.label,
            confidence=row.confidence,
            scores=scores,
            input=None if row.input is None else npy_load(row.input).tolist(),
            request_id=row.request_id,
            tags=row.tags,
            ingested=ingested,
        )


def _request_id(ctx: bentoml.Context | None) -> str:
    return _request_id_of(ctx.request.headers if ctx is not None else {})


def _request_id_of(headers: Mapping[str, str]) -> str:
    given = headers.get("x-request-id")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


# Every request is bounded before it is parsed: bodies by `RequestLimits`, request heads by the
# HTTP protocol the worker's uvicorn picks (this module is imported before its server is set up).
cast(Any, Predictor).add_asgi_middleware(RequestLimits, limits=lambda: Settings().body_limits)  # a Service at run time
use_bounded_heads()
