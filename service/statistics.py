"""Inference statistics per model version, as the Open Inference Protocol's statistics extension
(Triton's) reports them, from times the data plane takes as each request goes through it.

For a request answered, from `received` (the data plane got the request) to `done` (its answer is
made and its records are in the log):

- compute_input: `received` until the batch went to the batcher (reading and checking the samples);
- queue: waiting in the batcher for a model call to take it;
- compute_infer: the model call that ran it (the whole call, counted once for each request in it);
- compute_output: the call's end until `done` (scores, labels, ids and the log append);
- success: `received` until `done`, so the four add up to it.

`inference_count` counts samples, `execution_count` model calls, `batch_stats` the calls by their
number of samples. A request that fails after it was received counts in `fail`. Each worker process
counts what it answers and shares its counts (`snapshot`) a few times a second; a worker answers
the statistics with its own counts and the others' latest snapshots summed (`report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from feedback.keys import Keys
from service.batching import Timed

logger = logging.getLogger(__name__)

SHARE_EVERY_S = 0.25

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += _ns(seconds)

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class VersionStatistics:
    last_inference_ms: int = 0
    inference_count: int = 0  # samples
    execution_count: int = 0  # model calls
    durations: dict[str, Duration] = field(default_factory=lambda: {d: Duration() for d in DURATIONS})
    batches: dict[int, Duration] = field(default_factory=dict)  # a call's time, by its samples


class Statistics:
    """The counts of one worker process, by (model name, version)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # routes that read them may run in threads
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def _of(self, name: str, version: str) -> VersionStatistics:
        key = (name, version)
        found = self._versions.get(key)
        if found is None:
            found = self._versions[key] = VersionStatistics()
        return found

    def answered(
        self,
        name: str,
        version: str,
        *,
        samples: int,
        received: float,
        submitted: float,
        timed: Timed[Any],
        done: float,
    ) -> None:
        """A request answered: `received`, `submitted` and `done` are `time.perf_counter()` readings."""
        with self._lock:
            stats = self._of(name, version)
            stats.last_inference_ms = int(self._clock() * 1000)
            stats.inference_count += samples
            durations = stats.durations
            durations["success"].add(done - received)
            durations["compute_input"].add(submitted - received)
            durations["queue"].add(timed.queued_s)
            durations["compute_infer"].add(timed.infer_s)
            durations["compute_output"].add(done - timed.ended)
            if timed.first:
                stats.execution_count += 1
                stats.batches.setdefault(timed.batch_size, Duration()).add(timed.infer_s)

    def failed(self, name: str, version: str, *, seconds: float) -> None:
        with self._lock:
            self._of(name, version).durations["fail"].add(seconds)

    def snapshot(self) -> dict[str, Any]:
        """Every count as JSON, to share with the other workers."""
        with self._lock:
            return {f"{name}:{version}": _as_snapshot(s) for (name, version), s in self._versions.items()}

    def versions(self, name: str, others: Iterable[dict[str, Any]] = ()) -> list[str]:
        """The versions of `name` that have counted something here or in the `others`' snapshots."""
        with self._lock:
            found = [version for (model, version) in self._versions if model == name]
        for snapshot in others:
            found += [key.partition(":")[2] for key in snapshot if key.partition(":")[0] == name]
        return list(dict.fromkeys(found))

    def _summed(self, name: str, version: str, others: Iterable[dict[str, Any]]) -> VersionStatistics:
        total = VersionStatistics()
        own = self._versions.get((name, version))
        shared = [s for s in (own and _as_snapshot(own), *(o.get(f"{name}:{version}") for o in others)) if s]
        for s in shared:
            total.last_inference_ms = max(total.last_inference_ms, s["last"])
            total.inference_count += s["inferences"]
            total.execution_count += s["executions"]
            for kind, (count, ns) in s["durations"].items():
                total.durations[kind].count += count
                total.durations[kind].ns += ns
            for size, (count, ns) in s["batches"].items():
                batch = total.batches.setdefault(int(size), Duration())
                batch.count += count
                batch.ns += ns
        return total

    def report(
        self, versions: Iterable[tuple[str, str, str]], others: Iterable[dict[str, Any]] = ()
    ) -> list[dict[str, Any]]:
        """The protocol's `model_stats` for each (name, version, version as reported), this worker's
        counts and the `others`' snapshots summed: zeros for a version that has answered nothing."""
        out = []
        others = list(others)
        with self._lock:
            for name, version, reported in versions:
                stats = self._summed(name, version, others)
                out.append(
                    {
                        "name": name,
                        "version": reported,
                        "last_inference": stats.last_inference_ms,
                        "inference_count": stats.inference_count,
                        "execution_count": stats.execution_count,
                        "inference_stats": {k: d.as_json() for k, d in stats.durations.items()},
                        "batch_stats": [
                            {"batch_size": size, "compute_infer": d.as_json()}
                            for size, d in sorted(stats.batches.items())
                        ],
                        "memory_usage": [],
                    }
                )
        return out


def _as_snapshot(stats: VersionStatistics) -> dict[str, Any]:
    return {
        "last": stats.last_inference_ms,
        "inferences": stats.inference_count,
        "executions": stats.execution_count,
        "durations": {k: [d.count, d.ns] for k, d in stats.durations.items()},
        "batches": {str(size): [d.count, d.ns] for size, d in stats.batches.items()},
    }


async def share(statistics: Statistics, redis_url: str, keys: Keys, worker: str) -> None:
    """Put this worker's counts in the shared hash whenever they changed, a few times a second,
    and take them out when it stops (a background task of the service worker; a worker killed
    leaves its last counts)."""
    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
    shared = ""
    try:
        while True:
            current = json.dumps(statistics.snapshot())
            if current != shared:
                try:
                    await client.hset(keys.statistics, worker, current)
                    shared = current
                except (redis.RedisError, OSError) as exc:
                    logger.debug("statistics not shared: %s", exc)
            await asyncio.sleep(SHARE_EVERY_S)
    finally:  # the worker stops: its counts go with it, as a server's do when it restarts
        with contextlib.suppress(redis.RedisError, OSError):
            await client.hdel(keys.statistics, worker)
        await client.aclose()


def others(redis_url: str, keys: Keys, worker: str) -> Callable[[], list[dict[str, Any]]]:
    """What the other workers last shared (nothing when Redis cannot be read: this worker's own
    counts are answered alone)."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)

    def read() -> list[dict[str, Any]]:
        try:
            found: dict[bytes, bytes] = client.hgetall(keys.statistics)  # type: ignore[assignment]
        except (redis.RedisError, OSError) as exc:
            logger.warning("the other workers' statistics are unavailable: %s", exc)
            return []
        return [json.loads(raw) for name, raw in found.items() if name.decode() != worker]

    return read
