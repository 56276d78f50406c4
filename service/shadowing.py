"""A model's shadow in a worker: the same samples a client was answered for, run through another
stored version after the answer left, off the request path.

`Shadowing.offer` is all the request path does: a draw against the shadow's share and, if drawn,
a `put_nowait` on a bounded queue (full: the batch is dropped and counted). A task of its own takes
what is queued (up to `TAKE_AT_ONCE` batches), runs it in one call through the shadow's own slot
(its own session, batcher and thread), and appends its predictions to the prediction log as one
`ShadowBatch`, under the answered predictions' ids and request ids. A shadow whose calls fail or hang
`FAILURES_TO_STOP` times in a row is stopped, and `on_stop` is told why (the service records and
announces it); it never delays an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import psycopg
import redis
from numpy.typing import NDArray

from feedback import shadow
from feedback.errors import NotFound
from feedback.predictions.log import PredictionLog
from feedback.predictions.records import ShadowBatch
from models.signature import postprocess
from service import database, metrics
from service.batching import Overloaded
from service.serving import ModelSlot, Where

logger = logging.getLogger(__name__)

QUEUE_BATCHES = 256  # answered batches waiting for the shadow; beyond, dropped
TAKE_AT_ONCE = 128  # queued batches run by the shadow in one call
CALL_TIMEOUT_S = 10.0  # a shadow call slower than this counts as failed
FAILURES_TO_STOP = 3  # failed calls in a row that stop the shadow


@dataclass(frozen=True)
class _Mirrored:
    batch: NDArray[np.float32]
    ids: list[uuid.UUID]
    request_id: str
    answer_ms: float  # the answer's model call (queue and inference), as the request waited for it


@dataclass
class ShadowCounts:
    mirrored: int = 0  # batches queued for the shadow
    dropped: int = 0  # batches not run: the queue was full, or the shadow over its latency budget
    failed: int = 0  # batches whose shadow call failed or timed out (or whose records were not logged)
    stored: int = 0  # samples whose shadow prediction was appended to the log


@dataclass
class Shadowing:
    """`model_name`'s shadow at `version`, seeing `share` of its answered batches."""

    model_name: str
    version: str
    share: float
    where: Where
    log: PredictionLog | None
    on_stop: Callable[[str, str], Awaitable[None]] | None = None  # (model name, why)
    call_timeout_s: float = CALL_TIMEOUT_S
    draw: Callable[[], float] = random.random
    counts: ShadowCounts = field(default_factory=ShadowCounts)
    stopped: str | None = None  # why, once stopped
    slot: ModelSlot = field(init=False)

    def __post_init__(self) -> None:
        self.slot = ModelSlot(self.model_name, self.version, self.where, serves=False)
        self._queue: asyncio.Queue[_Mirrored] = asyncio.Queue(maxsize=QUEUE_BATCHES)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Load the shadow beside the server and start taking what is offered (in the event loop)."""
        self.slot.start_loading()
        self._task = asyncio.get_running_loop().create_task(self._consume(), name=f"shadow-{self.model_name}")
        logger.info("shadowing %s with version %s at share %g", self.model_name, self.version, self.share)

    def offer(self, batch: NDArray[np.float32], ids: list[uuid.UUID], request_id: str, answer_ms: float) -> None:
        """An answered batch, for the shadow to see (or not: the share, a full queue); never waits.
        `answer_ms`: how long the answer's model call took, to set beside the shadow's."""
        if self.stopped is not None or self.draw() >= self.share:
            return
        try:
            self._queue.put_nowait(_Mirrored(batch, ids, request_id, answer_ms))
        except asyncio.QueueFull:
            self._count("dropped")
            return
        self._count("mirrored")

    async def close(self) -> None:
        if self.stopped is None:
            self.stopped = "closed"
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self._closed:
            self._closed = True
            await self.slot.close()

    def _count(self, outcome: str, n: int = 1) -> None:
        setattr(self.counts, outcome, getattr(self.counts, outcome) + n)
        metrics.shadow_batches.labels(model_name=self.model_name, outcome=outcome).inc(n)

    async def _consume(self) -> None:
        await asyncio.to_thread(self.slot.loaded.wait)
        if self.slot.served is None:
            await self._stop(f"version {self.version} could not be loaded: {self.slot.load_error}")
            return
        failures = 0
        while True:
            taken = [await self._queue.get()]
            while len(taken) < TAKE_AT_ONCE and not self._queue.empty():
                taken.append(self._queue.get_nowait())
            try:
                await self._run(taken)
                failures = 0
            except Exception as exc:
                failures += 1
                self._count("failed", len(taken))
                logger.warning("the shadow %s:%s failed: %s", self.model_name, self.version, _describe(exc))
                if failures >= FAILURES_TO_STOP:
                    await self._stop(f"{failures} shadow calls failed in a row, the last: {_describe(exc)}")
                    return

    async def _run(self, taken: list[_Mirrored]) -> None:
        """One model call for everything taken, one append of its records."""
        batch = taken[0].batch if len(taken) == 1 else np.concatenate([m.batch for m in taken])
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.call_timeout_s):
                logits, used = await self.slot.batcher().submit(batch)
        except Overloaded:
            self._count("dropped", len(taken))
            return
        outputs = postprocess(logits, used.stored.card.model_spec.output_kind)
        names = used.stored.card.signature.class_names
        predicted = ShadowBatch(
            ids=[i for m in taken for i in m.ids],
            model_name=self.model_name,
            model_version=used.stored.version,
            scores=outputs.probabilities,
            labels=[names[i] for i in outputs.labels],
            confidences=outputs.confidences,
            request_ids=[m.request_id for m in taken for _ in m.ids],
            answer_ms=np.array([m.answer_ms for m in taken for _ in m.ids], dtype=np.float32),
            shadow_ms=(time.perf_counter() - started) * 1000,
        )
        if self.log is not None:
            await self.log.append([predicted])
        self._count("stored", len(predicted.ids))

    async def _stop(self, reason: str) -> None:
        self.stopped = reason
        logger.error("stopped the shadow %s:%s: %s", self.model_name, self.version, reason)
        if self.on_stop is not None:
            try:
                await self.on_stop(self.model_name, reason)
            except Exception:
                logger.exception("could not record that the shadow of %s stopped", self.model_name)
        await self.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the call timeout"
    return f"{type(exc).__name__}: {exc}"


class Shadows:
    """This worker's shadows, at most one a model, kept as Postgres says (Redis's announcement
    when Postgres cannot be read): set on start, on each announcement, on the periodic check."""

    def __init__(
        self,
        running: dict[str, Shadowing],
        *,
        models: list[str],
        where: Where,
        log: Callable[[], PredictionLog | None],
    ) -> None:
        self.running = running  # the data plane's: what `Predictions.run` offers answered batches to
        self.models = models
        self.where = where
        self.log = log

    async def set(self, model_name: str, version: str | None, share: float | None) -> None:
        """Make the model's shadow `version` at `share` (None: no shadow)."""
        current = self.running.get(model_name)
        if current is not None and version == current.version and share == current.share:
            return
        if current is not None:
            del self.running[model_name]
            await current.close()
            logger.info("the shadow %s:%s stopped here", model_name, current.version)
        if version is None or share is None or model_name not in self.models:
            return
        shadowing = Shadowing(model_name, version, share, self.where, self.log(), on_stop=self._record_stop)
        self.running[model_name] = shadowing
        shadowing.start()

    async def on_message(self, data: bytes | str) -> None:
        try:
            announced = json.loads(data)
            model_name = announced["model_name"]
            version, share = announced.get("model_version"), announced.get("share")
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed shadow message: %r", data)
            return
        await self.set(model_name, version, None if share is None else float(share))

    async def recheck(self) -> None:
        for model_name in self.models:
            found = await asyncio.to_thread(self._read, model_name)
            if found is not None:
                await self.set(model_name, *found)

    def _read(self, model_name: str) -> tuple[str | None, float | None] | None:
        """The model's live shadow (version, share), (None, None) for none; None if nothing could be read."""
        where = self.where
        if where.database_url is not None:
            try:
                with database.connect(where.database_url, connect_timeout_s=3) as conn:
                    live = shadow.current(conn=conn, model_name=model_name)
                return (None, None) if live is None else (live.model_version, live.share)
            except psycopg.Error as exc:
                logger.warning("shadow of %s not read from Postgres: %s", model_name, exc)
        if where.redis_url is not None:
            try:
                with redis.Redis.from_url(where.redis_url, socket_connect_timeout=2, socket_timeout=2) as client:
                    raw = client.get(where.keys.shadow(model_name))
                if raw is not None:
                    announced = json.loads(raw)
                    return announced.get("model_version"), announced.get("share")
            except (redis.RedisError, ValueError) as exc:
                logger.warning("shadow of %s not read from Redis: %s", model_name, exc)
        return None

    async def _record_stop(self, model_name: str, reason: str) -> None:
        """A shadow that failed here is stopped everywhere: recorded, then announced."""
        stopped = self.running.get(model_name)
        if stopped is not None and stopped.stopped is not None:
            del self.running[model_name]  # it closes itself
        await asyncio.to_thread(self._stop_recorded, model_name, reason)

    def _stop_recorded(self, model_name: str, reason: str) -> None:
        where = self.where
        if where.database_url is None:
            return
        with database.connect(where.database_url, connect_timeout_s=3) as conn:
            try:
                shadow.stop(conn=conn, model_name=model_name, reason=reason, actor=None)
            except NotFound:
                return  # another worker stopped it first
        if where.redis_url is not None:
            with redis.Redis.from_url(where.redis_url, socket_connect_timeout=2, socket_timeout=5) as client:
                shadow.announce(client, where.keys, model_name, None)

    async def close(self) -> None:
        for model_name in list(self.running):
            await self.running.pop(model_name).close()
