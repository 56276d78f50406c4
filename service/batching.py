"""An in-process adaptive batcher for one model per worker.

Requests that arrive while the model is busy are merged into the next call, up to
`max_batch_size` samples. Nothing waits on a timer: at low load a request runs at once
(batch of one, no added latency), at high load batches grow by themselves. A request that has
waited longer than `max_latency_s` is failed with `Overloaded` instead of run late.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
from numpy.typing import NDArray

from feedback import errors

logger = logging.getLogger(__name__)

C = TypeVar("C")

InferFn = Callable[[NDArray[Any]], tuple[NDArray[Any], C]]


class Overloaded(errors.Overloaded):
    """The request waited longer than the latency budget before a model call could take it."""


class BatcherClosed(errors.Unavailable):
    """The batcher is shutting down and takes no more work."""


class Timed(NamedTuple, Generic[C]):
    """A request's outputs, with where its time went (the protocol's statistics read them)."""

    outputs: NDArray[Any]
    context: C
    queued_s: float  # from `submit` until its batch's model call began
    infer_s: float  # the batch's model call
    ended: float  # `time.perf_counter()` when the call returned
    batch_size: int  # samples in the call
    first: bool  # the first request of its call: the one that counts the call once


@dataclass
class _Pending(Generic[C]):
    batch: NDArray[Any]
    future: asyncio.Future[Timed[C]]
    enqueued: float = field(default_factory=time.perf_counter)


def _lower_priority(niceness: int) -> None:
    """Lower the calling thread's priority: on Linux each thread is scheduled as a task of its own,
    which `setpriority` names by its thread id. Elsewhere, or when refused, it runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError) as exc:
        logger.warning("could not lower the inference thread's priority: %s", exc)


class AdaptiveBatcher(Generic[C]):
    """Merge concurrent `submit` calls into single calls of `infer` on one worker thread.

    `infer` takes the concatenated batch and returns per-sample outputs (first axis aligned
    with the input) plus a context object shared by the whole batch (e.g. the model version
    that produced it).
    """

    def __init__(
        self,
        infer: InferFn[C],
        *,
        max_batch_size: int,
        max_latency_s: float,
        on_batch: Callable[[int, float], None] | None = None,
        niceness: int = 0,
    ) -> None:
        """`niceness` > 0 lowers the worker thread's scheduling priority by that much (Linux): a
        batcher whose work may wait, such as a shadow's, yields the CPU to those that answer."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._infer = infer
        self._max_batch_size = max_batch_size
        self._max_latency_s = max_latency_s
        self._on_batch = on_batch
        self._queue: deque[_Pending[C]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="infer",
            initializer=functools.partial(_lower_priority, niceness) if niceness > 0 else None,
        )
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, batch: NDArray[Any]) -> tuple[NDArray[Any], C]:
        """Queue `batch` (N, ...) and wait for its N outputs."""
        timed = await self.submit_timed(batch)
        return timed.outputs, timed.context

    async def submit_timed(self, batch: NDArray[Any]) -> Timed[C]:
        """`submit`, with the time the request waited and its call took."""
        if self._closed:
            raise BatcherClosed("the batcher is shut down")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="adaptive-batcher")
        future: asyncio.Future[Timed[C]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(batch, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Finish queued work, then stop the loop and the worker thread."""
        self._closed = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                # One turn of the loop lets handlers that are already runnable enqueue too.
                await asyncio.sleep(0)
            taken = self._take()
            if not taken:
                continue
            inputs = taken[0].batch if len(taken) == 1 else np.concatenate([p.batch for p in taken])
            started = time.perf_counter()
            try:
                outputs, context = await loop.run_in_executor(self._executor, self._infer, inputs)
            except Exception as exc:  # the model failed: every request in the batch learns why
                logger.exception("model call failed for a batch of %d samples", len(inputs))
                for pending in taken:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            ended = time.perf_counter()
            if self._on_batch is not None:
                self._on_batch(len(inputs), ended - started)
            offset, first = 0, True
            for pending in taken:
                n = len(pending.batch)
                if not pending.future.done():  # the client may have gone away
                    waited = started - pending.enqueued
                    part = outputs[offset : offset + n]
                    pending.future.set_result(Timed(part, context, waited, ended - started, ended, len(inputs), first))
                    first = False
                offset += n

    def _take(self) -> list[_Pending[C]]:
        """Pop requests up to `max_batch_size` samples (always at least one request)."""
        now = time.perf_counter()
        taken: list[_Pending[C]] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled by its caller
                self._queue.popleft()
                continue
            if now - head.enqueued > self._max_latency_s:
                self._queue.popleft()
                waited_ms = (now - head.enqueued) * 1000
                head.future.set_exception(
                    Overloaded(f"request waited {waited_ms:.0f} ms for the model, over the latency budget")
                )
                continue
            if taken and size + len(head.batch) > self._max_batch_size:
                break
            taken.append(self._queue.popleft())
            size += len(head.batch)
        return taken
