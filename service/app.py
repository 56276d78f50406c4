"""The BentoML service: the prediction routes (`POST /predict` with JSON, uploads and `.npy`; the
Open Inference Protocol under `/v2`), `GET /models`, `GET /predictions/{id}` and its input, the
review and admin routers (`service/routes/`), and BentoML's probes and metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, cast

import bentoml
import numpy as np
import psycopg
import redis
from fastapi import FastAPI, Query
from numpy.typing import NDArray
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response

from feedback.datasets import LabelSchema, originals_for
from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.predictions import dead_letters, ingest
from feedback.predictions.log import Event, LogPolicy, LogUnavailable, PredictionLog
from feedback.predictions.records import PredictionRecord, input_json, unstorable_text
from feedback.predictions.store import StoredPrediction, fetch_prediction
from feedback.use_cases import announcer
from models import store
from models.images import ImageError
from models.images import decode as decode_image
from models.images import to_tensor as image_tensor
from models.npy import npy_bytes, read_npy
from models.provenance import code_version
from models.signature import InputError, Outputs, Signature, postprocess, to_batch
from models.spec import ImageInput
from service import fast_path, metrics
from service.batching import BatcherClosed, Overloaded
from service.contract import NO_NUL, ContractRoute, ItemId, ModelVersion, OpenAPIContract, method_not_allowed
from service.inference import InferenceUnavailable
from service.limits import UPLOAD_ROUTE, ConcurrencyLimit, RequestLimits, use_bounded_heads
from service.problems import ProblemDetails, documented, problem_response
from service.routes import v2
from service.routes.admin import DataLoopContext
from service.routes.admin import router as admin_router
from service.routes.review import ModerationContext
from service.routes.review import router as review_router
from service.schemas import (
    EXAMPLE_INPUT,
    BatchingPublic,
    ModelPublic,
    ModelsPublic,
    PredictionPublic,
    PredictResponse,
    ReferencePublic,
    SignaturePublic,
    StoredPredictionPublic,
)
from service.serving import ModelSlot, Served, Where
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = "loop"

STARTUP_WAIT_S = 10.0  # how long a request waits for the worker's first model load before a 503
CHAMPION_CHECK_S = 30.0  # how often a worker asks who the champion is, besides listening for promotions

routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
routes.router.route_class = ContractRoute  # every route: no unknown query parameter, problem details
routes.add_exception_handler(405, method_not_allowed)
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
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=NO_NUL)]
_TAGS: TypeAdapter[dict[str, str]] = TypeAdapter(Annotated[dict[TagKey, TagValue], Field(max_length=16)])

# One sample as JSON: numbers nested to the model's input shape (four axes at most), or the base64
# text of an image. The served model decides which, and the shape: GET /models says.
_NUMBERS: dict[str, Any] = {"type": "number"}
for _ in range(4):
    _NUMBERS = {"anyOf": [{"type": "number"}, {"type": "array", "minItems": 1, "items": _NUMBERS}]}
_SAMPLE_SCHEMA = {"anyOf": [*_NUMBERS["anyOf"], {"type": "string", "minLength": 1, "format": "byte"}]}


class PredictRequest(BaseModel):
    """The body of POST /predict: only these members."""

    model_config = ConfigDict(extra="forbid")

    samples: Annotated[
        list[Any],
        Field(
            min_length=1,
            description="Samples to classify: for tensor models, each of the model's input shape "
            "(see GET /models); for image models, base64 text of each image (or upload files instead).",
            examples=[[EXAMPLE_INPUT]],
            json_schema_extra={"items": _SAMPLE_SCHEMA},
        ),
    ]
    # Either member may be left out, but not sent as null: the schema says a string, an object.
    tags: Annotated[
        dict[TagKey, TagValue],
        Field(
            default=None,
            max_length=16,
            description="Client labels stored with each prediction.",
            examples=[{"app": "scanner"}],
        ),
    ]
    model: Annotated[
        ModelName,
        Field(default=None, description="The served model to ask (see GET /models); default: the first one."),
    ]


@dataclass(frozen=True)
class Answered:
    """A batch answered and logged: the ids, the model's outputs and the version that made them."""

    ids: list[uuid.UUID]
    outputs: Outputs
    served: Served

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.served.stored.card.signature.class_names


@dataclass(frozen=True)
class Refusal:
    """A request not answered with predictions: the status and why."""

    status: int
    message: str


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


def _error(status: int, message: str, ctx: bentoml.Context | None = None, *, v2: bool = False) -> Any:
    """An error as problem details; the Open Inference Protocol's routes also carry its `error`."""
    if ctx is not None:  # BentoML applies the context's status code over the response's
        ctx.response.status_code = status
    return problem_response(status, message, extra={"error": message} if v2 else None)


def _statement_timeout(settings: Settings) -> str:
    """libpq options: no statement of the service's runs longer than the setting (it is then a 503)."""
    return f"-c statement_timeout={round(settings.statement_timeout_s * 1000)}"


def _count_log_event(event: Event, n: int) -> None:
    metrics.log_records.labels(event=event.value).inc(n)


_V2_READY: dict[int | str, dict[str, Any]] = {200: {"description": "Ready"}, **documented(404, 422, 503)}
_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(v2.DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "The tensor's elements, flat or nested (JSON tensors)."},
    },
}
_V2_INFER: dict[str, Any] = {
    "responses": {
        200: {
            "description": "Probabilities and labels; the prediction ids in `parameters.prediction_ids`",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **documented(400, 404, 413, 415, 429, 503),
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "An inference request (JSON tensors, or a JSON header followed by binary data "
            "with Inference-Header-Content-Length).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "parameters": {"type": "object"},
                            "inputs": {"type": "array", "minItems": 1, "items": _V2_TENSOR},
                            "outputs": {"type": "array", "items": {"type": "object"}},
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


# The prediction routes: what a per-request access log line and a trace span cost there is about
# as much as the prediction itself (see docs/benchmarks.md, "The prediction path's cost"), so both are off by default.
PREDICTION_PATHS = ["/predict", "/predict/npy", UPLOAD_ROUTE]
PREDICTION_URLS = [r"/predict(/npy|/files)?$", r"/v2/models/[^/]+(/versions/[^/]+)?/infer$"]


def _bentoml_config(settings: Settings) -> dict[str, Any]:
    """BentoML's per-service settings: the access log and tracing skip predictions unless asked."""
    return {
        "traffic": {"timeout": 30},
        "logging": {"access": {"skip_paths": [] if settings.access_log_predictions else PREDICTION_PATHS}},
        "tracing": {"excluded_urls": [] if settings.trace_predictions else PREDICTION_URLS},
    }


@bentoml.service(name=SERVICE_NAME, **_bentoml_config(Settings()))
@bentoml.asgi_app(routes, path="/")
class Predictor:
    """Serves one or several models from the BentoML store, each with its own adaptive batcher
    and champion; logs every prediction."""

    def __init__(self) -> None:
        self.settings = Settings()
        logging.getLogger("bentoml._internal.server.http_app").addFilter(_QuietClientErrors())
        _log_to_stderr("service", "feedback", "models")
        self.keys = Keys(self.settings.redis_prefix)
        where = Where(
            database_url=self.settings.database_url,
            redis_url=self.settings.redis_url,
            keys=self.keys,
            device=self.settings.device,
            ort_threads=self.settings.ort_threads,
            max_batch_size=self.settings.max_batch_size,
            max_latency_s=self.settings.max_latency_ms / 1000,
            reference_tolerance=self.settings.reference_tolerance,
            exact_math_fallback=self.settings.exact_math_fallback,
            inference_socket=self._inference_socket(),
        )
        self.slots = {name: ModelSlot(name, tag, where) for name, tag in self.settings.served_models}
        self.default = next(iter(self.slots.values()))
        self._log: PredictionLog | None = None
        self._log_error: str | None = None
        self._pool: AsyncConnectionPool | None = None
        self._review_pool: ConnectionPool | None = None
        self._background: list[asyncio.Task[None]] = []
        if self.settings.log_predictions and self.settings.redis_url is None:
            self._log_error = "LOOP_REDIS_URL is not set (`loop serve` starts an embedded Redis)"
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self._answered_headers = [  # of every prediction answered by the fast path, as BentoML's route answers
            (b"content-type", b"application/json"),
            (b"x-loop-worker", self.worker.encode("latin-1")),
            (b"server", f"BentoML Service/{SERVICE_NAME}".encode()),
        ]
        # Loading runs beside the server so that /livez answers at once and /readyz tells the truth.
        for slot in self.slots.values():
            slot.start_loading()

    def _inference_socket(self) -> Path | None:
        """The shared inference process this worker sends its batches to: worker i (from 1) uses
        process i-1 mod N, so that the workers spread evenly over the GPUs."""
        if not self.settings.shared_inference:
            return None
        worker = bentoml.server_context.worker_index or 1
        return self.settings.inference_socket_for((worker - 1) % (self.settings.inference_processes or 1))

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
                        slot = self.slots.get(name)
                        if slot is not None and slot.follows_champion:
                            await slot.reload(f"{name}:{version}")
            except (redis.RedisError, OSError) as exc:
                logger.warning("promotion channel unavailable (%s); retrying", exc)
                await asyncio.sleep(2.0)
            finally:
                await client.aclose()

    async def _recheck(self) -> None:
        for slot in self.slots.values():
            await slot.recheck()

    @bentoml.on_startup
    async def startup(self) -> None:
        settings = self.settings
        if settings.fast_path and not (settings.access_log_predictions or settings.trace_predictions):
            fast_path.take("/predict", self._predict_json, max_body_bytes=settings.body_limits.predict,
                           max_in_flight=settings.max_concurrency)  # fmt: skip
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
        if settings.redis_url is not None and any(s.follows_champion for s in self.slots.values()):
            self._background.append(asyncio.create_task(self._follow_champion(settings.redis_url), name="champion"))
        if settings.database_url is not None:
            self._pool = AsyncConnectionPool(
                settings.database_url,
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": 5, "options": _statement_timeout(settings)},
            )
            await self._pool.open(wait=False)  # serving must not wait for Postgres
            self._review_pool = ConnectionPool(
                settings.database_url,
                min_size=1,
                max_size=8,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": 5, "options": _statement_timeout(settings)},
            )
            self._review_pool.open(wait=False)
            routes.state.moderation = ModerationContext(
                pool=self._review_pool,
                lease_seconds=settings.review_lease_seconds,
                max_leases=settings.review_max_leases,
                overlap=settings.review_overlap,
                overlap_share=settings.review_overlap_share,
                labels=lambda: self._class_names(self.default.name),
                labels_of=self._class_names,
                to_input=self._sample_input,
                model_name=self.default.name,
            )
            routes.state.data_loop = DataLoopContext(
                model_name=self.default.name,
                schema=self._label_schema,
                originals=lambda conn, name: originals_for(conn, name, settings.split_path),
                datasets_root=settings.datasets_root,
                announcer=None if settings.redis_url is None else announcer(settings.redis_url, self.keys),
            )

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
        if any(slot.served is None for slot in self.slots.values()):
            return False
        if not self.settings.log_predictions:
            return True
        if self._log is None:
            return False
        return self._log.redis_available or self.settings.log_policy is LogPolicy.SPOOL

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        fast_path.release("/predict")
        for slot in self.slots.values():
            await slot.close()
        for task in self._background:
            task.cancel()
        if self._log is not None:
            await self._log.close()
        if self._pool is not None:
            await self._pool.close()
        if self._review_pool is not None:
            self._review_pool.close()

    def _class_names(self, model_name: str) -> tuple[str, ...] | None:
        slot = self.slots.get(model_name)
        served = None if slot is None else slot.served
        return None if served is None else served.stored.card.signature.class_names

    def _signature_of(self, slot: ModelSlot) -> Signature:
        """The served version's signature, or (before it loads) the store's newest's: classes and
        input shape are the same across a model's versions."""
        served = slot.served
        return (served.stored if served is not None else store.get(slot.fallback_ref)).card.signature

    def _label_schema(self, name: str) -> LabelSchema:
        """A served model's classes and inputs, as its datasets are compiled; LookupError if not served."""
        slot = self.slots.get(name)
        if slot is None:
            raise LookupError(f"no model {name!r} is served here; served: {', '.join(self.slots)}")
        if slot.served is None:
            return LabelSchema.of(self._signature_of(slot))
        return LabelSchema.of(slot.served.stored.card.model_spec)

    def _sample_input(self, model_name: str, given: Any) -> tuple[bytes, str | None]:
        """A sample a reviewer adds, checked against the model and turned into what is stored:
        .npy bytes of the tensor, or the image's bytes as sent with its media type."""
        slot = self.slots.get(model_name)
        if slot is None:
            raise LookupError(f"no model {model_name!r} is served here; served: {', '.join(self.slots)}")
        served = slot.served
        if served is None:
            raise ValueError(f"{model_name} is not loaded yet")
        spec = served.stored.card.model_spec
        if isinstance(spec.input, ImageInput):
            if not isinstance(given, bytes):
                raise ValueError(f"{model_name} takes images: send the sample as `image`")
            return given, decode_image(given, spec.input).media_type  # ImageError: a ValueError
        if isinstance(given, bytes):
            raise ValueError(f"{model_name} takes numbers: send the sample as `input`")
        return npy_bytes(to_batch([given], served.stored.card.signature, max_samples=1)[0]), None

    def _slot(self, name: str | None) -> ModelSlot | Refusal:
        if name is None:
            return self.default
        slot = self.slots.get(name)
        if slot is None:
            return Refusal(404, f"no model {name!r} is served here; served: {', '.join(self.slots)}")
        return slot

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(
        self,
        samples: list[Any],
        tags: dict[str, str] | None = None,
        model: str | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]  # BentoML passes the request context
    ) -> PredictResponse:
        """Classify one or many samples; every answer carries its prediction id and is stored."""
        request_id = _request_id(ctx)
        answer = await self._classify(self._slot(model), samples, tags or {}, request_id)
        if isinstance(answer, Refusal):
            return _error(answer.status, answer.message, ctx)
        if ctx is not None:
            ctx.response.headers["X-Request-ID"] = request_id
            ctx.response.headers["X-Loop-Worker"] = self.worker
        return answer

    async def _predict_json(self, body: bytes, headers: Mapping[bytes, bytes]) -> fast_path.Answer | None:
        """`predict` for service.fast_path: the same checks and answers, without BentoML's dispatch.
        A body `PredictRequest` refuses is left to `predict` (None): its answer is the documented one."""
        try:
            request = PredictRequest.model_validate_json(body or b"{}")
        except ValidationError:
            return None
        given = headers.get(b"x-request-id")
        request_id = _chosen_request_id(None if given is None else given.decode("latin-1"))
        answer = await self._classify(self._slot(request.model), request.samples, request.tags or {}, request_id)
        if isinstance(answer, Refusal):
            return fast_path.Answer.problem(answer.status, answer.message)
        answered = [(b"x-request-id", request_id.encode("latin-1")), *self._answered_headers]
        return fast_path.Answer(200, answer.model_dump_json().encode(), answered)

    @routes.post(
        "/predict/npy",
        response_model=PredictResponse,
        responses=documented(400, 404, 413, 415, 422, 429, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "One .npy array: N samples of the model's input shape, or one sample.",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def predict_npy(self, request: Request, model: Annotated[ModelName | None, Query()] = None) -> Any:
        """Classify samples sent as one .npy array (N x input shape, or one sample): no JSON to parse."""
        request_id = _request_id_of(request.headers)
        body = await request.body()  # bounded by `RequestLimits` before it is read
        try:
            array = read_npy(body)
        except InputError as exc:
            return _error(400, str(exc))
        slot = self._slot(model)
        served = None if isinstance(slot, Refusal) else slot.served
        if served is not None and array.shape == served.stored.card.signature.input_shape:
            array = array[np.newaxis]  # one sample
        answer = await self._classify(slot, array, {}, request_id)
        if isinstance(answer, Refusal):
            return _error(answer.status, answer.message)
        headers = {"X-Request-ID": request_id, "X-Loop-Worker": self.worker}
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)

    async def _classify(
        self, slot: ModelSlot | Refusal, samples: Any, tags: dict[str, str], request_id: str
    ) -> PredictResponse | Refusal:
        """Check `samples` (numbers, or images as bytes / base64 text) against the slot's model and answer."""
        served = await self._ready(slot)
        if isinstance(served, Refusal):
            return served
        assert isinstance(slot, ModelSlot)
        spec = served.stored.card.model_spec.input
        sent: list[tuple[bytes, str]] | None = None  # images as sent, with their media types
        try:
            if isinstance(spec, ImageInput):
                images = _image_samples(samples)
                limit = self.settings.max_samples_per_request
                batch, sent = await asyncio.to_thread(_preprocess_images, images, spec, max_samples=limit)
            else:
                if isinstance(samples, list) and samples and all(isinstance(x, str) for x in samples):
                    raise InputError(f"{slot.name} takes numbers, not images: send samples of its input shape")
                batch = to_batch(
                    samples, served.stored.card.signature, max_samples=self.settings.max_samples_per_request
                )
        except (InputError, ImageError) as exc:
            return Refusal(400, str(exc))
        return await self._answer(slot, batch, sent, tags, request_id)

    async def _ready(self, slot: ModelSlot | Refusal) -> Served | Refusal:
        if isinstance(slot, Refusal):
            return slot
        if slot.served is None and slot.load_error is None:
            # Workers start one by one behind one port: a request that reaches one still loading
            # waits for it (briefly) rather than failing while its neighbours already answer.
            await asyncio.to_thread(slot.loaded.wait, STARTUP_WAIT_S)
        reason = slot.not_ready() or self._log_not_ready()
        if reason is not None:
            return Refusal(503, f"not ready: {reason}")
        assert slot.served is not None
        return slot.served

    async def _answer(
        self,
        slot: ModelSlot,
        batch: NDArray[np.float32],
        sent: list[tuple[bytes, str]] | None,
        tags: dict[str, str],
        request_id: str,
    ) -> PredictResponse | Refusal:
        answered = await self._run(slot, batch, sent, tags, request_id)
        if isinstance(answered, Refusal):
            return answered
        out, stored, names = answered.outputs, answered.served.stored, answered.class_names
        predictions = [
            PredictionPublic(
                id=prediction_id,
                label=names[out.labels[i]],
                confidence=float(out.confidences[i]),
                scores=dict(zip(names, out.probabilities[i].tolist(), strict=True)),
                model_name=stored.name,
                model_version=stored.version,
            )
            for i, prediction_id in enumerate(answered.ids)
        ]
        return PredictResponse(request_id=request_id, predictions=predictions)

    async def _run(
        self,
        slot: ModelSlot,
        batch: NDArray[np.float32],
        sent: list[tuple[bytes, str]] | None,
        tags: dict[str, str],
        request_id: str,
    ) -> Answered | Refusal:
        """Batch, infer, and log every sample before anything is answered."""
        try:
            logits, used = await slot.batcher().submit(batch)
        except (Overloaded, BatcherClosed, InferenceUnavailable) as exc:
            return Refusal(503, str(exc))
        outputs = postprocess(logits, used.stored.card.model_spec.output_kind)
        answered = Answered(ids=[uuid7() for _ in range(len(batch))], outputs=outputs, served=used)
        out, names = answered.outputs, answered.class_names
        if self._log is not None:
            records = [
                PredictionRecord(
                    id=prediction_id,
                    model_name=used.stored.name,
                    model_version=used.stored.version,
                    input=batch[i],
                    scores=out.probabilities[i],
                    label=names[out.labels[i]],
                    confidence=float(out.confidences[i]),
                    request_id=request_id,
                    tags=tags,
                    input_bytes=None if sent is None else sent[i][0],
                    input_type=None if sent is None else sent[i][1],
                )
                for i, prediction_id in enumerate(answered.ids)
            ]
            try:
                await self._log.append(records)  # before the answer leaves: what we answer is kept
            except LogUnavailable as exc:
                return Refusal(503, f"prediction not stored, so not answered: {exc}")
        metrics.predictions.labels(model_name=used.stored.name, model_version=used.stored.version).inc(len(batch))
        return answered

    @routes.post(
        UPLOAD_ROUTE,
        response_model=PredictResponse,
        responses=documented(400, 404, 413, 415, 429, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": "string", "format": "binary"},
                                    "description": "One file part per image (any part name).",
                                },
                                "model": {"type": "string", "description": "The served model to ask."},
                                "tags": {"type": "string", "description": "A JSON object of client labels."},
                            },
                        }
                    }
                },
            }
        },
    )
    async def predict_files(self, request: Request) -> Any:
        """Classify uploaded images (multipart/form-data: one file part per image; optional fields
        `model` and `tags`, a JSON object). `POST /predict` with a multipart body lands here too."""
        request_id = _request_id_of(request.headers)
        upload = await self._read_upload(request)
        if isinstance(upload, Refusal):
            return _error(upload.status, upload.message)
        slot, spec, images, tags = upload
        limit = self.settings.max_samples_per_request
        try:
            batch, sent = await asyncio.to_thread(_preprocess_images, images, spec, max_samples=limit)
        except (InputError, ImageError) as exc:
            return _error(400, str(exc))
        answer = await self._answer(slot, batch, sent, tags, request_id)
        if isinstance(answer, Refusal):
            return _error(answer.status, answer.message)
        headers = {"X-Request-ID": request_id, "X-Loop-Worker": self.worker}
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)

    async def _read_upload(
        self, request: Request
    ) -> tuple[ModelSlot, ImageInput, list[bytes], dict[str, str]] | Refusal:
        """The files, tags and model of an upload, checked; the form's files are closed after."""
        limit = self.settings.max_samples_per_request
        try:
            form = await request.form(max_files=limit, max_fields=8, max_part_size=64 * 1024)
        except (HTTPException, MultiPartException, AssertionError, KeyError, ValueError) as exc:
            # Starlette says "too many files", "missing boundary" and the like with an HTTPException.
            detail = exc.detail if isinstance(exc, HTTPException) else getattr(exc, "message", None) or str(exc)
            return Refusal(400, f"the form cannot be read: {detail or type(exc).__name__}")
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            try:
                tags = _form_tags(fields.get("tags"))
            except ValueError as exc:
                return Refusal(400, str(exc))
            slot = self._slot(fields.get("model") or None)
            served = await self._ready(slot)
            if isinstance(served, Refusal):
                return served
            assert isinstance(slot, ModelSlot)
            spec = served.stored.card.model_spec.input
            if not isinstance(spec, ImageInput):
                return Refusal(
                    415, f"{slot.name} takes numbers as JSON (application/json) on POST /predict, not uploaded files"
                )
            if not files:
                return Refusal(400, "the form has no files: send each image as a file part")
            return slot, spec, [await f.read() for f in files], tags
        finally:
            await form.close()

    # -- the Open Inference Protocol (KServe v2 REST) ----------------------------------------------

    @routes.get("/v2", tags=["v2"])
    def v2_server(self) -> Any:
        """Server metadata: name, version and the protocol extensions it speaks."""
        return {"name": "loop", "version": code_version(), "extensions": ["binary_tensor_data"]}

    @routes.get("/v2/health/live", tags=["v2"], response_class=Response, responses={200: {"description": "Live"}})
    def v2_live(self) -> Any:
        """200 while the worker runs."""
        return Response(status_code=200)

    @routes.get(
        "/v2/health/ready",
        tags=["v2"],
        response_class=Response,
        responses={200: {"description": "Ready"}, **documented(503)},
    )
    def v2_ready(self) -> Any:
        """200 once every model is loaded and predictions can be kept."""
        return Response(status_code=200) if self.__is_ready__() else _error(503, "not ready", v2=True)

    @routes.get("/v2/models/{name}", tags=["v2"], responses=documented(404, 422, 503))
    @routes.get("/v2/models/{name}/versions/{version}", tags=["v2"], responses=documented(404, 422, 503))
    def v2_model(self, name: ModelName, version: ModelVersion | None = None) -> Any:
        """Model metadata: platform, versions, inputs and outputs (-1 is the batch axis)."""
        found = self._v2_served(name, version)
        if isinstance(found, Refusal):
            return _error(found.status, found.message, v2=True)
        _, served = found
        card = served.stored.card
        spec = card.model_spec
        image = isinstance(spec.input, ImageInput)
        return {
            "name": served.stored.name,
            "versions": [served.stored.version],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {
                    "name": spec.onnx_input,
                    "datatype": "BYTES" if image else "FP32",
                    "shape": [-1] if image else [-1, *card.signature.input_shape],
                }
            ],
            "outputs": [
                {"name": v2.SCORES, "datatype": "FP32", "shape": [-1, len(spec.classes)]},
                {"name": v2.LABEL, "datatype": "BYTES", "shape": [-1]},
            ],
        }

    @routes.get("/v2/models/{name}/ready", tags=["v2"], response_class=Response, responses=_V2_READY)
    @routes.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"], response_class=Response, responses=_V2_READY)
    def v2_model_ready(self, name: ModelName, version: ModelVersion | None = None) -> Any:
        """200 when that model (and version) is loaded here."""
        found = self._v2_served(name, version)
        return (
            Response(status_code=200)
            if not isinstance(found, Refusal)
            else _error(found.status, found.message, v2=True)
        )

    def _v2_served(self, name: str, version: str | None) -> tuple[ModelSlot, Served] | Refusal:
        slot = self.slots.get(name)
        if slot is None:
            return Refusal(404, f"unknown model {name!r}; served: {', '.join(self.slots)}")
        if slot.served is None:
            return Refusal(503, f"model {name!r} is not ready: {slot.not_ready()}")
        if version is not None and version != slot.served.stored.version:
            return Refusal(
                404, f"model {name!r} version {version!r} is not the one loaded ({slot.served.stored.version})"
            )
        return slot, slot.served

    @routes.post("/v2/models/{name}/infer", tags=["v2"], **_V2_INFER)
    @routes.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"], **_V2_INFER)
    async def v2_infer(self, request: Request, name: ModelName, version: ModelVersion | None = None) -> Any:
        """Inference: JSON or binary tensors in; class probabilities and labels out, and the
        prediction ids (stored like every prediction) in the answer's parameters."""
        body = await request.body()  # bounded by `RequestLimits` before it is read
        try:
            parsed = v2.parse(body, request.headers.get("inference-header-content-length"))
        except v2.ProtocolError as exc:
            return _error(exc.status, str(exc), v2=True)
        found = self._v2_served(name, version)
        if isinstance(found, Refusal):
            return _error(found.status, found.message, v2=True)
        slot, served = found
        prepared = await self._v2_batch(served, parsed)
        if isinstance(prepared, Refusal):
            return _error(prepared.status, prepared.message, v2=True)
        batch, sent = prepared
        request_id = parsed.id or _request_id_of(request.headers)
        answered = await self._run(slot, batch, sent, {}, request_id)
        if isinstance(answered, Refusal):
            return _error(answered.status, answered.message, v2=True)
        names = answered.class_names
        content, header_length = v2.response(
            parsed,
            model_name=answered.served.stored.name,
            model_version=answered.served.stored.version,
            probabilities=answered.outputs.probabilities,
            labels=[names[i] for i in answered.outputs.labels],
            prediction_ids=[str(i) for i in answered.ids],
        )
        headers = {"X-Request-ID": request_id, "X-Loop-Worker": self.worker}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(content, media_type="application/octet-stream", headers=headers)

    async def _v2_batch(
        self, served: Served, request: v2.InferRequest
    ) -> tuple[NDArray[np.float32], list[tuple[bytes, str]] | None] | Refusal:
        """The request's one input, checked like any `/predict` sample."""
        spec = served.stored.card.model_spec
        if len(request.inputs) != 1 or request.inputs[0].name != spec.onnx_input:
            given = [t.name for t in request.inputs]
            return Refusal(400, f"{served.stored.name} takes one input named {spec.onnx_input!r}, got {given}")
        (tensor,) = request.inputs
        limit = self.settings.max_samples_per_request
        try:
            if isinstance(spec.input, ImageInput):
                if tensor.datatype != "BYTES" or len(tensor.shape) != 1:
                    raise InputError(f"input {tensor.name!r} must be BYTES of shape [N] (encoded images), "
                                     f"got {tensor.datatype} {list(tensor.shape)}")  # fmt: skip
                assert not isinstance(tensor.values, np.ndarray)  # BYTES are a list
                # Binary elements are the images; JSON can only carry them as base64 text.
                images = (
                    tensor.values if tensor.binary else _base64_images([v.decode("latin-1") for v in tensor.values])
                )
                return await asyncio.to_thread(_preprocess_images, images, spec.input, max_samples=limit)
            if tensor.datatype in ("BYTES", "BOOL") or not isinstance(tensor.values, np.ndarray):
                raise InputError(
                    f"input {tensor.name!r} takes numbers (FP32 or an integer type), not {tensor.datatype}"
                )
            return to_batch(cast(Any, tensor.values), served.stored.card.signature, max_samples=limit), None
        except (InputError, ImageError) as exc:
            return Refusal(400, str(exc))

    @routes.get(
        "/predictions/{prediction_id}/input",
        response_class=Response,
        responses={
            200: {
                "description": "The input as sent: an image's own media type, or an array as .npy",
                "content": {
                    media: {"schema": {"type": "string", "format": "binary"}}
                    for media in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
                },
            },
            **documented(404, 422, 503),
        },
    )
    async def prediction_input(self, prediction_id: ItemId) -> Any:
        """A stored prediction's input byte for byte: the image as sent, or the array as .npy."""
        found = await self._find(prediction_id)
        if isinstance(found, Refusal):
            return _error(found.status, found.message)
        row, _ = found
        if row.input is None:
            return _error(404, f"the input of {prediction_id} was erased")
        return Response(row.input, media_type=row.input_type or "application/octet-stream")

    def _log_not_ready(self) -> str | None:
        if self.settings.log_predictions and self._log is None:
            return self._log_error or "the prediction log is starting"
        return None

    def _model_public(self, served: Served) -> ModelPublic:
        card = served.stored.card
        return ModelPublic(
            name=served.stored.name,
            version=served.stored.version,
            provider=served.runtime.provider,
            providers=served.runtime.providers,
            fallback_reason=served.runtime.fallback_reason,
            reference=None if served.reference is None else ReferencePublic(**asdict(served.reference)),
            input_kind=card.model_spec.input.kind,
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

    @routes.get("/models", response_model=ModelsPublic, responses=documented(503))
    def models(self) -> Any:
        """Every model this worker serves (the default first): version, provider, signature."""
        loaded = [slot.served for slot in self.slots.values() if slot.served is not None]
        waiting = {name: reason for name, slot in self.slots.items() if (reason := slot.not_ready()) is not None}
        if not loaded:
            return _error(503, "not ready: " + "; ".join(f"{n}: {r}" for n, r in waiting.items()))
        return ModelsPublic(
            default=self.default.name, models=[self._model_public(s) for s in loaded], not_ready=waiting
        )

    @routes.get(
        "/models/{name}",
        response_model=ModelPublic,
        responses=documented(404, 422, 503),
    )
    def model(self, name: ModelName) -> Any:
        """One served model: version, provider, signature."""
        slot = self.slots.get(name)
        if slot is None:
            return _error(404, f"no model {name!r} is served here; served: {', '.join(self.slots)}")
        if slot.served is None:
            return _error(503, f"not ready: {slot.not_ready()}")
        return self._model_public(slot.served)

    @routes.get(
        "/predictions/{prediction_id}",
        response_model=StoredPredictionPublic,
        responses=documented(404, 422, 503),
    )
    async def prediction(self, prediction_id: ItemId) -> Any:
        """A stored prediction with its input: from Postgres, or from the stream if not yet ingested."""
        found = await self._find(prediction_id)
        if isinstance(found, Refusal):
            return _error(found.status, found.message)
        return self._public(*found)

    async def _find(self, prediction_id: uuid.UUID) -> tuple[StoredPrediction, bool] | Refusal:
        """The stored prediction and whether it is ingested yet: Postgres first, then the stream.
        `prediction_id` is a UUIDv7: the routes' `ItemId` took nothing else."""
        if self._pool is None and self._log is None:
            return Refusal(503, "no prediction store is configured")
        failures = []
        if self._pool is not None:
            try:
                async with self._pool.connection(timeout=2) as conn:
                    row = await fetch_prediction(conn=conn, prediction_id=prediction_id)
                if row is not None:
                    return row, True
            except (psycopg.OperationalError, TimeoutError) as exc:
                failures.append(f"Postgres: {exc}")
        if self._log is not None:
            try:
                record = await self._log.find(prediction_id)
            except redis.RedisError as exc:
                failures.append(f"Redis: {exc}")
            else:
                if record is not None:
                    return StoredPrediction.from_record(record), False
        if failures:
            return Refusal(503, "could not look everywhere: " + "; ".join(failures))
        return Refusal(404, f"no prediction {prediction_id}")

    def _public(self, row: StoredPrediction, ingested: bool) -> StoredPredictionPublic:
        scores: dict[str, float] | list[float] = list(row.scores)
        names = self._class_names(row.model_name)
        if names is not None and len(names) == len(row.scores):
            scores = dict(zip(names, row.scores, strict=True))
        return StoredPredictionPublic(
            id=row.id,
            created_at=row.created_at,
            model_name=row.model_name,
            model_version=row.model_version,
            label=row.label,
            confidence=row.confidence,
            scores=scores,
            input=None if row.input is None else input_json(row.input, row.input_type),
            input_type=row.input_type,
            request_id=row.request_id,
            tags=row.tags,
            ingested=ingested,
        )


def _image_samples(samples: Any) -> list[bytes]:
    """JSON samples of an image model: base64 text, or data URLs (`data:image/png;base64,...`)."""
    if not isinstance(samples, list):
        raise InputError("samples must be a list of images")
    for index, sample in enumerate(samples):
        if not isinstance(sample, str):
            raise InputError(f"samples[{index}] is not an image: this model takes base64 text or uploaded files")
    return _base64_images(samples)


def _base64_images(texts: list[str]) -> list[bytes]:
    images = []
    for index, text in enumerate(texts):
        encoded = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
        try:
            images.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise InputError(f"samples[{index}] is not base64 text") from None
    return images


def _preprocess_images(
    images: list[bytes], spec: ImageInput, *, max_samples: int
) -> tuple[NDArray[np.float32], list[tuple[bytes, str]]]:
    """Decode and pre-process every image (or raise naming the first bad one), at most `max_samples`."""
    if not images:
        raise InputError("samples is empty: send at least one image")
    if len(images) > max_samples:
        raise InputError(f"too many samples: {len(images)} > the limit of {max_samples} per request")
    tensors, sent = [], []
    for index, data in enumerate(images):
        try:
            decoded = decode_image(data, spec)
        except ImageError as exc:
            raise ImageError(f"samples[{index}]: {exc}") from None
        tensors.append(image_tensor(decoded.image, spec))
        sent.append((data, decoded.media_type))
    return np.stack(tensors), sent


def _form_tags(raw: str | None) -> dict[str, str]:
    if not raw:  # no field, or an empty one: no tags
        return {}
    try:
        return _TAGS.validate_json(raw)
    except ValidationError as exc:
        raise ValueError(f"the tags field is not a JSON object of at most 16 short strings: {exc.errors()[0]['msg']}") \
            from None  # fmt: skip


def _request_id(ctx: bentoml.Context | None) -> str:
    return _request_id_of(ctx.request.headers if ctx is not None else {})


def _request_id_of(headers: Mapping[str, str]) -> str:
    return _chosen_request_id(headers.get("x-request-id"))


def _chosen_request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is short printable text, else a new one."""
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex


# Every request is bounded before it is parsed: bodies by `RequestLimits`, request heads by the
# HTTP protocol the worker's uvicorn picks (this module is imported before its server is set up).
cast(Any, Predictor).add_asgi_middleware(RequestLimits, limits=lambda: Settings().body_limits)  # a Service at run time
cast(Any, Predictor).add_asgi_middleware(ConcurrencyLimit, limit=lambda: Settings().max_concurrency)
cast(Any, Predictor).add_asgi_middleware(ProblemDetails)  # errors of BentoML's own as problem details too
cast(Any, Predictor).add_asgi_middleware(OpenAPIContract)  # the schema documents those problem details
use_bounded_heads(Settings().http_parser)
fast_path.install()
