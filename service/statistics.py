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
counts what it answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from service.batching import Timed

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

    def versions(self, name: str) -> list[str]:
        """The versions of `name` that have counted something here."""
        with self._lock:
            return [version for (model, version) in self._versions if model == name]

    def report(self, versions: Iterable[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """The protocol's `model_stats` for each (name, version, version as reported): zeros for a
        version that has answered nothing."""
        out = []
        with self._lock:
            for name, version, reported in versions:
                stats = self._versions.get((name, version)) or VersionStatistics()
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
