"""The BentoML service: its lifecycle and wiring. Each worker loads the served models (a slot
each, following its champion, and a model's shadow while one runs: `service.shadowing`), opens
the prediction log and the database pools, and hands the
prediction data plane (`service.predictions`) to the faces: `POST /predict` with JSON (BentoML's
API below, and the fast path), the routers of `service/routes/` (uploads and `.npy`, the Open
Inference Protocol under `/v2`, `/models` and stored predictions, review and admin), and BentoML's
probes and metrics."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import socket
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import bentoml
import redis
from psycopg_pool import ConnectionPool
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import Message

from feedback.datasets import originals_for
from feedback.errors import DomainError, Malformed
from feedback.keys import Keys
from feedback.predictions import blobs
from feedback.predictions.log import LogPolicy, PredictionLog
from feedback.use_cases import announcer, shadow_announcer
from models.npy import read_npy
from models.signature import InputError
from service import database, fast_path, logs, metrics, problems, statistics
from service.contract import OpenAPIContract
from service.fetching import Fetcher
from service.limits import UPLOAD_ROUTE, ConcurrencyLimit, RequestLimits, replay_body, use_bounded_heads
from service.predictions import Predictions
from service.problems import ProblemDetails
from service.repository import Repository
from service.routes import application, guidelines, health, label_studio, open_inference, predict, repository, reviewers
from service.routes import models as models_routes
from service.routes.admin import DataLoopContext
from service.routes.admin import router as admin_router
from service.routes.dependencies import ModerationContext
from service.routes.faces import PredictRequest, chosen_request_id
from service.routes.fields import ModelName, ModelVersion
from service.routes.review import router as review_router
from service.schemas import BatchingPublic, PredictResponse
from service.serving import ModelSlot, Where
from service.settings import Settings
from service.shadowing import Shadows

logger = logging.getLogger(__name__)

SERVICE_NAME = "loop"

CHAMPION_CHECK_S = 30.0  # how often a worker asks who the champion is, besides listening for promotions

_FACES = (predict.router, open_inference.router, repository.router, models_routes.router, label_studio.router)
routes = application(*_FACES, review_router, admin_router, health.router, guidelines.router, reviewers.router)


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
        logs.set_up()
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
            engine=self.settings.engine,
        )
        self.slots = {name: ModelSlot(name, tag, where) for name, tag in self.settings.served_models}
        self.default = next(iter(self.slots.values()))
        self.plane = Predictions(
            self.slots, max_samples=self.settings.max_samples_per_request, log_required=self.settings.log_predictions
        )
        self.shadows = Shadows(self.plane.shadows, models=list(self.slots), where=where, log=lambda: self.plane.log)
        self.repository = Repository(
            self.plane, where, configured=list(self.slots), keys=self.keys, redis_url=self.settings.redis_url
        )
        self._review_pool: ConnectionPool | None = None
        self._background: list[asyncio.Task[None]] = []
        if self.settings.log_predictions and self.settings.redis_url is None:
            self.plane.log_error = "LOOP_REDIS_URL is not set (`loop serve` starts an embedded Redis)"
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        routes.state.predictions = self.plane  # what the routers of service/routes/ answer with
        routes.state.worker = self.worker
        routes.state.is_ready = self.__is_ready__
        routes.state.repository = self.repository
        routes.state.fetcher = Fetcher.of(self.settings)  # the images Label Studio's tasks name
        routes.state.batching = BatchingPublic(
            max_batch_size=self.settings.max_batch_size,
            max_latency_ms=self.settings.max_latency_ms,
            max_samples_per_request=self.settings.max_samples_per_request,
        )
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
        """Swap to each new champion and start or stop each shadow: at once on a message, and on a
        periodic check that catches messages missed while disconnected."""
        import redis.asyncio as aioredis

        while True:
            client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.keys.promotions, self.keys.shadows, self.keys.repository_events)
                    await self._recheck()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=CHAMPION_CHECK_S)
                        if message is None:
                            await self._recheck()
                            continue
                        if message["channel"] == self.keys.shadows.encode():
                            await self.shadows.on_message(message["data"])
                            continue
                        if message["channel"] == self.keys.repository_events.encode():
                            await self.repository.follow()
                            continue
                        try:
                            announced = json.loads(message["data"])
                            name, version = announced["model_name"], announced["model_version"]
                        except (ValueError, KeyError, TypeError):
                            logger.warning("ignored a malformed promotion message: %r", message["data"])
                            continue
                        await self.shadows.set(name, None, None)  # a new champion ends the model's shadow
                        slot = self.plane.slots.get(name)  # loaded through the repository too
                        if slot is not None and slot.follows_champion:
                            await slot.reload(f"{name}:{version}")
            except (redis.RedisError, OSError) as exc:
                logger.warning("promotion channel unavailable (%s); retrying", exc)
                await asyncio.sleep(2.0)
            finally:
                await client.aclose()

    async def _recheck(self) -> None:
        await self.repository.follow()
        for slot in list(self.plane.slots.values()):
            await slot.recheck()
        await self.shadows.recheck()

    def _take_fast_paths(self, settings: Settings) -> None:
        """Every prediction face answered in front of BentoML's stack (`service.fast_path`)."""
        take = functools.partial(
            fast_path.take, max_body_bytes=settings.body_limits.predict, max_in_flight=settings.max_concurrency
        )
        take("/predict", self._predict, media_types=(*JSON, *FORM_TYPES))  # uploads come here too
        take("/predict/npy", self._predict_npy, media_types=NPY_TYPES, query=True)
        for path in V2_INFER:
            take(path, self._v2_infer, media_types=V2_TYPES)
        take(UPLOAD_ROUTE, self._predict_files, media_types=FORM_TYPES)

    @bentoml.on_startup
    async def startup(self) -> None:
        settings = self.settings
        if settings.fast_path and not (settings.access_log_predictions or settings.trace_predictions):
            self._take_fast_paths(settings)
        # Everything imported so far lives as long as the worker: out of the collector's sight, a
        # full collection no longer walks the libraries' millions of objects while requests wait.
        gc.collect()
        gc.freeze()
        if settings.log_predictions and settings.redis_url is not None:
            self.plane.log = PredictionLog(
                settings.redis_url,
                keys=self.keys,
                spool_dir=settings.spool_dir,
                writer=self.worker,
                policy=settings.log_policy,
                on_event=metrics.count_log_event,
                max_stream_bytes=settings.stream_max_bytes,
            )
            self._background.append(asyncio.create_task(self.plane.log.run_replayer(), name="spool-replay"))
            self._background.append(asyncio.create_task(metrics.watch_stream(settings.redis_url, self.keys)))
        if settings.redis_url is not None:  # champions and shadows; the statistics every worker answers with
            self._background.append(asyncio.create_task(self._follow_champion(settings.redis_url), name="champion"))
            shared = statistics.share(self.plane.statistics, settings.redis_url, self.keys, self.worker)
            self._background.append(asyncio.create_task(shared, name="statistics"))
            self.plane.other_statistics = statistics.others(settings.redis_url, self.keys, self.worker)
        if settings.database_url is not None:
            blobs.attach(settings.database_url, settings.blob_store())  # where large inputs are read from
            timeout = settings.statement_timeout_s
            self.plane.pool = database.async_pool(settings.database_url, max_size=4, statement_timeout_s=timeout)
            await self.plane.pool.open(wait=False)  # serving must not wait for Postgres
            self._review_pool = database.pool(settings.database_url, max_size=8, statement_timeout_s=timeout)
            self._review_pool.open(wait=False)
            routes.state.moderation = ModerationContext(
                pool=self._review_pool,
                lease_seconds=settings.review_lease_seconds,
                max_leases=settings.review_max_leases,
                overlap=settings.review_overlap,
                overlap_share=settings.review_overlap_share,
                mixed_share=settings.review_shadow_mixed_share,
                gold_share=settings.review_gold_share,
                labels=lambda: self.plane.class_names(self.default.name),
                labels_of=self.plane.class_names,
                to_input=self.plane.sample_input,
                model_name=self.default.name,
            )
            redis_url = settings.redis_url
            routes.state.data_loop = DataLoopContext(
                model_name=self.default.name,
                schema=self.plane.label_schema,
                originals=lambda conn, name: originals_for(conn, name, settings.split_path),
                datasets_root=settings.datasets_root,
                announcer=None if redis_url is None else announcer(redis_url, self.keys),
                shadow_announcer=None if redis_url is None else shadow_announcer(redis_url, self.keys),
                shadow_rules=settings.shadow_rules,
                health_alpha=settings.health_alpha,
                weighting=settings.weighting,
            )
            gauges = health.keep_gauges(self._review_pool, routes.state.data_loop, list(self.slots), settings)
            self._background.append(asyncio.create_task(gauges, name="health-gauges"))

    def __is_ready__(self) -> bool:
        if any(slot.served is None for slot in self.slots.values()):
            return False
        if not self.settings.log_predictions:
            return True
        log = self.plane.log
        if log is None:
            return False
        return log.redis_available or self.settings.log_policy is LogPolicy.SPOOL

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        fast_path.release("/predict")
        fast_path.release("/predict/npy")
        for path in (*V2_INFER, UPLOAD_ROUTE):
            fast_path.release(path)
        await self.shadows.close()
        for slot in list(self.plane.slots.values()):  # those loaded through the repository too
            await slot.close()
        for task in self._background:
            task.cancel()
        if self.plane.log is not None:
            await self.plane.log.close()
        if self.plane.pool is not None:
            await self.plane.pool.close()
        if self._review_pool is not None:
            self._review_pool.close()

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(
        self,
        samples: list[Any],
        tags: dict[str, str] | None = None,
        model: str | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]  # BentoML passes the request context
    ) -> PredictResponse:
        """Classify one or many samples; every answer carries its prediction id and is stored."""
        request_id = chosen_request_id(None if ctx is None else ctx.request.headers.get("x-request-id"))
        try:
            answer = await self.plane.classify(model, samples, tags or {}, request_id)
        except DomainError as exc:
            refusal: Any = problems.answer(exc)  # BentoML sends a response as it is...
            if ctx is not None:  # ... with the context's status code over the response's
                ctx.response.status_code = refusal.status_code
            return refusal
        if ctx is not None:
            ctx.response.headers["X-Request-ID"] = request_id
            ctx.response.headers["X-Loop-Worker"] = self.worker
        return answer

    async def _predict(self, incoming: fast_path.Incoming) -> fast_path.Answer | None:
        """`POST /predict` for service.fast_path: JSON samples, or uploaded images (a form)."""
        if fast_path.media_type(incoming.headers) in FORM_TYPES:
            return await self._predict_files(incoming)
        return await self._predict_json(incoming)

    async def _predict_json(self, incoming: fast_path.Incoming) -> fast_path.Answer | None:
        """`predict` for service.fast_path: the same checks and answers, without BentoML's dispatch.
        A body `PredictRequest` refuses is left to `predict` (None): its answer is the documented one."""
        try:
            request = PredictRequest.model_validate_json(incoming.body or b"{}")
        except ValidationError:
            return None
        request_id = _request_id(incoming.headers)
        return await self._fast_answer(
            request_id, self.plane.classify(request.model, request.samples, request.tags or {}, request_id)
        )

    async def _predict_npy(self, incoming: fast_path.Incoming) -> fast_path.Answer | None:
        """`POST /predict/npy` for service.fast_path; a query string other than one valid `model`
        is left to the route (None), which answers it as documented."""
        model = _model_query(incoming.query)
        if model is False:
            return None
        request_id = _request_id(incoming.headers)
        try:
            array = read_npy(incoming.body)
        except InputError as exc:
            return fast_path.Answer.refusing(Malformed(str(exc)))
        answering = self.plane.classify_array(model, array, request_id)
        return await self._fast_answer(request_id, answering, server=False)

    async def _predict_files(self, incoming: fast_path.Incoming) -> fast_path.Answer | None:
        """`POST /predict/files` (uploaded images) for service.fast_path: the form read and checked
        by the route's own code, from the body already read."""
        request = Request(incoming.scope, receive=replay_body(incoming.body, _disconnected))
        request_id = _request_id(incoming.headers)
        try:
            slot, spec, images, tags = await predict.read_upload(request, self.plane)
        except DomainError as exc:
            return fast_path.Answer.refusing(exc)
        answering = self.plane.classify_images(slot, spec, images, tags, request_id)
        return await self._fast_answer(request_id, answering, server=False)

    async def _v2_infer(self, incoming: fast_path.Incoming) -> fast_path.Answer | None:
        """The Open Inference Protocol's infer for service.fast_path (JSON, or binary tensors); a
        model or version name the route's checks would refuse is left to it (None)."""
        name, version = incoming.params["name"], incoming.params.get("version")
        if not (_valid(_MODEL_NAME, name) and (version is None or _valid(_MODEL_VERSION, version))):
            return None
        length = incoming.headers.get(b"inference-header-content-length")
        given = incoming.headers.get(b"x-request-id")
        try:
            inferred = await open_inference.infer(
                self.plane,
                name,
                version,
                incoming.body,
                header_length=None if length is None else length.decode("latin-1"),
                headers={} if given is None else {"x-request-id": given.decode("latin-1")},
            )
        except DomainError as exc:
            return fast_path.Answer.refusing(exc, v2=True)
        headers = [(b"x-request-id", inferred.request_id.encode()), *self._answered_headers[1:-1]]
        if inferred.header_length is None:
            return fast_path.Answer(200, inferred.content, [(b"content-type", b"application/json"), *headers])
        binary = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(inferred.header_length).encode()),
        ]
        return fast_path.Answer(200, inferred.content, [*binary, *headers])

    async def _fast_answer(
        self, request_id: str, answering: Awaitable[PredictResponse], *, server: bool = True
    ) -> fast_path.Answer:
        """The answer, as BentoML's API answers it (`server`: with its Server header) or as a mounted route does."""
        try:
            answer = await answering
        except DomainError as exc:
            return fast_path.Answer.refusing(exc)
        headers = self._answered_headers if server else self._answered_headers[:-1]
        return fast_path.Answer(
            200, answer.model_dump_json().encode(), [(b"x-request-id", request_id.encode()), *headers]
        )


NPY_TYPES = (b"application/octet-stream", b"")  # what `/predict/npy` takes on the fast path
JSON = (b"application/json",)
FORM_TYPES = (b"multipart/form-data",)  # uploaded images
V2_INFER = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
V2_TYPES = (b"application/json", b"application/octet-stream")  # JSON tensors, or binary ones after a JSON header
_MODEL_NAME: TypeAdapter[str] = TypeAdapter(ModelName)
_MODEL_VERSION: TypeAdapter[str] = TypeAdapter(ModelVersion)


def _valid(adapter: TypeAdapter[str], value: str) -> bool:
    try:
        adapter.validate_python(value)
    except ValidationError:
        return False
    return True


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}  # after the body, which the fast path has read already


def _request_id(headers: Mapping[bytes, bytes]) -> str:
    given = headers.get(b"x-request-id")
    return chosen_request_id(None if given is None else given.decode("latin-1"))


def _model_query(query: bytes) -> str | Literal[False] | None:
    """The `model` a query string names (None: none given); False for any other query string."""
    if not query:
        return None
    found = parse_qs(query.decode("latin-1"), keep_blank_values=True)
    if set(found) != {"model"} or len(found["model"]) != 1:
        return False
    model = found["model"][0]
    return model if _valid(_MODEL_NAME, model) else False


def _assemble(service: Any) -> None:
    """What stands around the service's routes, outermost first: the fast path (in front of the
    whole ASGI stack), BentoML's own middlewares, then these, in the order added: the body limits,
    the concurrency limit, BentoML's own errors reshaped as problem details, the schema that
    documents them. Request heads are bounded by the HTTP protocol the worker's uvicorn picks (this
    module is imported before its server is set up), so every request is bounded before it is read."""
    service.add_asgi_middleware(RequestLimits, limits=lambda: Settings().body_limits)
    service.add_asgi_middleware(ConcurrencyLimit, limit=lambda: Settings().max_concurrency)
    service.add_asgi_middleware(ProblemDetails)
    service.add_asgi_middleware(OpenAPIContract)
    use_bounded_heads(Settings().http_parser)
    fast_path.install()


_assemble(Predictor)
