"""The prediction data plane: check, batch, infer, log and answer, with no HTTP and no BentoML in it.

Every face calls it: JSON `POST /predict` (through BentoML's API and the fast path), `.npy`
bodies, uploaded images and the Open Inference Protocol. A request it will not answer raises a
domain error (`feedback.errors`) saying why; `service.problems` answers it, whichever face asked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import redis
from numpy.typing import NDArray
from psycopg_pool import AsyncConnectionPool

from feedback.datasets import LabelSchema
from feedback.errors import Invalid, Malformed, NotFound, Unavailable
from feedback.ids import uuid7
from feedback.predictions.log import LogUnavailable, PredictionLog
from feedback.predictions.records import PredictionRecord
from feedback.predictions.store import StoredPrediction, fetch_prediction
from models import store
from models.images import ImageError
from models.images import decode as decode_image
from models.images import to_tensor as image_tensor
from models.npy import npy_bytes
from models.signature import InputError, Outputs, Signature, postprocess, to_batch
from models.spec import ImageInput
from service import metrics
from service.schemas import PredictionPublic, PredictResponse
from service.serving import ModelSlot, Served
from service.shadowing import Shadowing
from service.statistics import Statistics

STARTUP_WAIT_S = 10.0  # how long a request waits for the worker's first model load before a 503

Images = list[tuple[bytes, str]]  # images as sent, with their media types


@dataclass(frozen=True)
class Answered:
    """A batch answered and logged: the ids, the model's outputs and the version that made them."""

    ids: list[uuid.UUID]
    outputs: Outputs
    served: Served

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.served.stored.card.signature.class_names

    def response(self, request_id: str) -> PredictResponse:
        out, stored, names = self.outputs, self.served.stored, self.class_names
        predictions = [
            PredictionPublic(
                id=prediction_id,
                label=names[out.labels[i]],
                confidence=float(out.confidences[i]),
                scores=dict(zip(names, out.probabilities[i].tolist(), strict=True)),
                model_name=stored.name,
                model_version=stored.version,
            )
            for i, prediction_id in enumerate(self.ids)
        ]
        return PredictResponse(request_id=request_id, predictions=predictions)


class Predictions:
    """The served models' predictions: each model's slot (its batcher and champion), the log every
    answer is appended to before it leaves, and the stored predictions to look up."""

    def __init__(self, slots: Mapping[str, ModelSlot], *, max_samples: int, log_required: bool) -> None:
        self.slots = dict(slots)
        self.default = next(iter(self.slots.values()))
        self.max_samples = max_samples
        self.log_required = log_required
        self.log: PredictionLog | None = None
        self.log_error: str | None = None  # why there is no log, when one is required
        self.pool: AsyncConnectionPool | None = None  # Postgres, for stored predictions
        self.shadows: dict[str, Shadowing] = {}  # by model: sees answered batches after they are answered
        self.statistics = Statistics()  # the protocol's statistics extension: where requests' time went
        self.other_statistics: Callable[[], list[dict[str, Any]]] = list  # the other workers' last counts
        self._numbers: dict[tuple[str, str], int] = {}  # (name, version) -> its number

    # -- which model ----------------------------------------------------------------------------

    def slot(self, name: str | None) -> ModelSlot:
        if name is None:
            return self.default
        slot = self.slots.get(name)
        if slot is None:
            raise NotFound(f"no model {name!r} is served here; served: {', '.join(self.slots)}")
        return slot

    async def ready(self, slot: ModelSlot) -> Served:
        """The slot's served model, once loaded and while predictions can be logged; else 503."""
        if slot.served is None and slot.load_error is None:
            # Workers start one by one behind one port: a request that reaches one still loading
            # waits for it (briefly) rather than failing while its neighbours already answer.
            await asyncio.to_thread(slot.loaded.wait, STARTUP_WAIT_S)
        reason = slot.not_ready() or self.log_not_ready()
        if reason is not None:
            raise Unavailable(f"not ready: {reason}")
        assert slot.served is not None
        return slot.served

    def log_not_ready(self) -> str | None:
        if self.log_required and self.log is None:
            return self.log_error or "the prediction log is starting"
        return None

    def loaded(self, name: str, version: str | None, *, unknown: str) -> tuple[ModelSlot, Served]:
        """A model loaded here (and that version, if given), without waiting; `unknown` says how
        an unknown name is answered (the faces word it differently)."""
        slot = self.slots.get(name)
        if slot is None:
            raise NotFound(unknown)
        if slot.served is None:
            raise Unavailable(f"model {name!r} is not ready: {slot.not_ready()}")
        stored = slot.served.stored
        if (
            version is not None
            and version != stored.version
            and version != _text(self.version_number(name, stored.version))
        ):
            raise NotFound(f"model {name!r} version {version!r} is not the one loaded ({stored.version})")
        return slot, slot.served

    def version_number(self, name: str, version: str) -> int | None:
        """A stored version's number, as Triton names versions (the model's oldest is 1): clients
        such as perf_analyzer read versions as numbers. None when the store does not hold it."""
        key = (name, version)
        if key not in self._numbers:  # a version's number never changes: the store only adds
            for number, stored in enumerate(store.list_models(name), start=1):
                self._numbers[(name, stored.version)] = number
        return self._numbers.get(key)

    def class_names(self, model_name: str) -> tuple[str, ...] | None:
        slot = self.slots.get(model_name)
        served = None if slot is None else slot.served
        return None if served is None else served.stored.card.signature.class_names

    def label_schema(self, name: str) -> LabelSchema:
        """A served model's classes and inputs, as its datasets are compiled; NotFound if not served."""
        slot = self.slots.get(name)
        if slot is None:
            raise NotFound(f"no model {name!r} is served here; served: {', '.join(self.slots)}")
        if slot.served is None:
            return LabelSchema.of(_signature_of(slot))
        return LabelSchema.of(slot.served.stored.card.model_spec)

    def sample_input(self, model_name: str, given: Any) -> tuple[bytes, str | None]:
        """A sample a reviewer adds, checked against the model and turned into what is stored:
        .npy bytes of the tensor, or the image's bytes as sent with its media type (a label is
        checked, so a sample that does not fit is `Invalid`: 422)."""
        slot = self.slots.get(model_name)
        if slot is None:
            raise NotFound(f"no model {model_name!r} is served here; served: {', '.join(self.slots)}")
        served = slot.served
        if served is None:
            raise Invalid(f"{model_name} is not loaded yet")
        spec = served.stored.card.model_spec
        try:
            if isinstance(spec.input, ImageInput):
                if not isinstance(given, bytes):
                    raise Invalid(f"{model_name} takes images: send the sample as `image`")
                return given, decode_image(given, spec.input).media_type
            if isinstance(given, bytes):
                raise Invalid(f"{model_name} takes numbers: send the sample as `input`")
            return npy_bytes(to_batch([given], served.stored.card.signature, max_samples=1)[0]), None
        except (InputError, ImageError) as exc:
            raise Invalid(str(exc)) from None

    # -- answering --------------------------------------------------------------------------------

    async def classify(self, model: str | None, samples: Any, tags: dict[str, str], request_id: str) -> PredictResponse:
        """Check `samples` (numbers, or images as base64 text) against the model and answer."""
        received = time.perf_counter()
        slot = self.slot(model)
        served = await self.ready(slot)
        spec = served.stored.card.model_spec.input
        sent: Images | None = None
        try:
            if isinstance(spec, ImageInput):
                batch, sent = await self.images(spec, image_samples(samples))
            else:
                if isinstance(samples, list) and samples and all(isinstance(x, str) for x in samples):
                    raise InputError(f"{slot.name} takes numbers, not images: send samples of its input shape")
                batch = to_batch(samples, served.stored.card.signature, max_samples=self.max_samples)
        except (InputError, ImageError) as exc:
            raise Malformed(str(exc)) from None
        return (await self.run(slot, batch, sent, tags, request_id, received=received)).response(request_id)

    async def classify_array(self, model: str | None, array: NDArray[Any], request_id: str) -> PredictResponse:
        """Samples sent as one array: N x the input shape, or one sample of it."""
        slot = self.slot(model)
        served = slot.served
        if served is not None and array.shape == served.stored.card.signature.input_shape:
            array = array[np.newaxis]  # one sample
        return await self.classify(model, array, {}, request_id)

    async def classify_images(
        self, slot: ModelSlot, spec: ImageInput, images: list[bytes], tags: dict[str, str], request_id: str
    ) -> PredictResponse:
        """Uploaded images, checked and pre-processed off the event loop, answered."""
        received = time.perf_counter()
        try:
            batch, sent = await self.images(spec, images)
        except (InputError, ImageError) as exc:
            raise Malformed(str(exc)) from None
        return (await self.run(slot, batch, sent, tags, request_id, received=received)).response(request_id)

    async def images(self, spec: ImageInput, images: list[bytes]) -> tuple[NDArray[np.float32], Images]:
        """Decode and pre-process images in a thread; `InputError` or `ImageError` naming the first bad one."""
        return await asyncio.to_thread(preprocess_images, images, spec, max_samples=self.max_samples)

    async def run(
        self,
        slot: ModelSlot,
        batch: NDArray[np.float32],
        sent: Images | None,
        tags: dict[str, str],
        request_id: str,
        *,
        received: float | None = None,
    ) -> Answered:
        """Batch, infer, and log every sample before anything is answered (`Unavailable` when the
        batcher is over its budget or closing, or the inference process is down). `received`: the
        `time.perf_counter()` when the request reached the data plane (for the statistics)."""
        started = time.perf_counter()
        received = started if received is None else received
        try:
            timed = await slot.batcher().submit_timed(batch)
            used = timed.context
            outputs = postprocess(timed.outputs, used.stored.card.model_spec.output_kind)
            answered = Answered(ids=[uuid7() for _ in range(len(batch))], outputs=outputs, served=used)
            if self.log is not None:
                await self.log.append(_records(answered, batch, sent, tags, request_id))
        except LogUnavailable as exc:  # before the answer leaves: what we answer is kept
            self._failed(slot, received)
            raise Unavailable(f"prediction not stored, so not answered: {exc}") from None
        except Exception:
            self._failed(slot, received)
            raise
        done = time.perf_counter()
        name, version = used.stored.name, used.stored.version
        self.statistics.answered(
            name, version, samples=len(batch), received=received, submitted=started, timed=timed, done=done
        )
        metrics.predictions.labels(model_name=name, model_version=version).inc(len(batch))
        shadowing = self.shadows.get(slot.name)
        if shadowing is not None:  # logged and about to be answered: the shadow's turn, off this path
            shadowing.offer(batch, answered.ids, request_id, (timed.ended - started) * 1000)
        return answered

    def _failed(self, slot: ModelSlot, received: float) -> None:
        served = slot.served
        if served is not None:
            self.statistics.failed(served.stored.name, served.stored.version, seconds=time.perf_counter() - received)

    # -- stored predictions -----------------------------------------------------------------------

    async def find(self, prediction_id: uuid.UUID) -> tuple[StoredPrediction, bool]:
        """The stored prediction and whether it is ingested yet: Postgres first, then the stream.
        `prediction_id` is a UUIDv7: the routes' `ItemId` took nothing else."""
        if self.pool is None and self.log is None:
            raise Unavailable("no prediction store is configured")
        failures = []
        if self.pool is not None:
            try:
                async with self.pool.connection(timeout=2) as conn:
                    row = await fetch_prediction(conn=conn, prediction_id=prediction_id)
                if row is not None:
                    return row, True
            except (psycopg.OperationalError, TimeoutError) as exc:
                failures.append(f"Postgres: {exc}")
        if self.log is not None:
            try:
                record = await self.log.find(prediction_id)
            except redis.RedisError as exc:
                failures.append(f"Redis: {exc}")
            else:
                if record is not None:
                    return StoredPrediction.from_record(record), False
        if failures:
            raise Unavailable("could not look everywhere: " + "; ".join(failures))
        raise NotFound(f"no prediction {prediction_id}")


def _text(number: int | None) -> str | None:
    return None if number is None else str(number)


def _records(
    answered: Answered, batch: NDArray[np.float32], sent: Images | None, tags: dict[str, str], request_id: str
) -> list[PredictionRecord]:
    out, stored, names = answered.outputs, answered.served.stored, answered.class_names
    return [
        PredictionRecord(
            id=prediction_id,
            model_name=stored.name,
            model_version=stored.version,
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


def _signature_of(slot: ModelSlot) -> Signature:
    """The served version's signature, or (before it loads) the store's newest's: classes and
    input shape are the same across a model's versions."""
    served = slot.served
    return (served.stored if served is not None else store.get(slot.fallback_ref)).card.signature


def image_samples(samples: Any) -> list[bytes]:
    """JSON samples of an image model: base64 text, or data URLs (`data:image/png;base64,...`)."""
    if not isinstance(samples, list):
        raise InputError("samples must be a list of images")
    for index, sample in enumerate(samples):
        if not isinstance(sample, str):
            raise InputError(f"samples[{index}] is not an image: this model takes base64 text or uploaded files")
    return base64_images(samples)


def base64_images(texts: list[str]) -> list[bytes]:
    images = []
    for index, text in enumerate(texts):
        encoded = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
        try:
            images.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise InputError(f"samples[{index}] is not base64 text") from None
    return images


def preprocess_images(images: list[bytes], spec: ImageInput, *, max_samples: int) -> tuple[NDArray[np.float32], Images]:
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
