from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service.batching import AdaptiveBatcher, BatcherClosed, Overloaded

pytestmark = pytest.mark.unit


class Model:
    """Doubles its input; records each batch size; optionally slow or failing."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s
        self.fail = fail
        self.threads: set[str] = set()

    def __call__(self, batch: NDArray[Any]) -> tuple[NDArray[Any], str]:
        self.sizes.append(len(batch))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return batch * 2, f"v{len(self.sizes)}"


def rows(start: int, n: int) -> NDArray[np.float32]:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


async def test_concurrent_requests_share_model_calls_and_get_their_own_rows() -> None:
    model = Model(delay_s=0.01)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=64, max_latency_s=5)
    sizes = [1, 3, 2, 5] * 10
    starts = np.cumsum([0, *sizes[:-1]])
    results = await asyncio.gather(*(batcher.submit(rows(int(s), n)) for s, n in zip(starts, sizes, strict=True)))
    await batcher.close()
    for (out, _), s, n in zip(results, starts, sizes, strict=True):
        np.testing.assert_array_equal(out, rows(int(s), n) * 2)
    assert sum(model.sizes) == sum(sizes)
    assert max(model.sizes) > 1  # requests were merged
    assert len(model.sizes) < len(sizes)
    assert all(name.startswith("infer") for name in model.threads)  # off the event loop


async def test_batches_never_exceed_the_maximum() -> None:
    model = Model(delay_s=0.005)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=8, max_latency_s=5)
    await asyncio.gather(*(batcher.submit(rows(i, 3)) for i in range(30)))
    await batcher.close()
    assert max(model.sizes) <= 8
    assert sum(model.sizes) == 90


async def test_a_request_larger_than_the_maximum_runs_alone() -> None:
    model = Model()
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=4, max_latency_s=5)
    out, _ = await batcher.submit(rows(0, 10))
    await batcher.close()
    assert model.sizes == [10]
    assert len(out) == 10


async def test_one_context_per_batch_reaches_every_request_in_it() -> None:
    model = Model(delay_s=0.01)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=64, max_latency_s=5)
    results = await asyncio.gather(*(batcher.submit(rows(i, 1)) for i in range(20)))
    await batcher.close()
    contexts = [ctx for _, ctx in results]
    assert set(contexts) == {f"v{i}" for i in range(1, len(model.sizes) + 1)}


async def test_requests_over_the_latency_budget_are_refused() -> None:
    model = Model(delay_s=0.2)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=1, max_latency_s=0.05)
    results = await asyncio.gather(*(batcher.submit(rows(i, 1)) for i in range(3)), return_exceptions=True)
    await batcher.close()
    assert not isinstance(results[0], BaseException)
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 2
    assert "over the latency budget" in str(refused[0])


async def test_a_model_failure_reaches_every_caller_and_the_batcher_goes_on() -> None:
    model = Model(fail=True)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=8, max_latency_s=5)
    results = await asyncio.gather(*(batcher.submit(rows(i, 1)) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    model.fail = False
    out, _ = await batcher.submit(rows(7, 1))
    await batcher.close()
    assert out[0, 0] == 14


async def test_close_finishes_queued_work_then_refuses_more() -> None:
    model = Model(delay_s=0.01)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=2, max_latency_s=5)
    pending = [asyncio.ensure_future(batcher.submit(rows(i, 1))) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(p.done() and not p.cancelled() and p.exception() is None for p in pending)
    with pytest.raises(BatcherClosed):
        await batcher.submit(rows(0, 1))


async def test_a_lone_request_runs_without_waiting_for_company() -> None:
    model = Model()
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=64, max_latency_s=60)
    # With a fill window the lone request would wait for more; here it must complete by itself.
    out, _ = await asyncio.wait_for(batcher.submit(rows(4, 1)), timeout=1.0)
    await batcher.close()
    assert model.sizes == [1]
    assert out[0, 0] == 8


async def test_each_request_learns_its_wait_and_its_call_and_one_a_call_counts_the_call() -> None:
    model = Model(delay_s=0.02)
    batcher: AdaptiveBatcher[str] = AdaptiveBatcher(model, max_batch_size=64, max_latency_s=5)
    first = asyncio.create_task(batcher.submit_timed(rows(0, 2)))
    await asyncio.sleep(0.005)  # the first call is running: the rest wait for the next
    timed = [*await asyncio.gather(*(batcher.submit_timed(rows(i, 2)) for i in range(1, 12))), await first]
    await batcher.close()
    calls: dict[str, list[Any]] = {}
    for t in timed:
        calls.setdefault(t.context, []).append(t)
    assert len(calls) == len(model.sizes) > 1
    for (version, requests), size in zip(sorted(calls.items(), key=lambda c: int(c[0][1:])), model.sizes, strict=True):
        assert [t.first for t in requests].count(True) == 1, version  # the call is counted once
        assert {t.batch_size for t in requests} == {size} and {t.infer_s for t in requests} == {requests[0].infer_s}
        assert requests[0].infer_s >= 0.02 and all(t.queued_s >= 0 for t in requests)
    later = [t for t in timed if t.context != "v1"]
    assert min(t.queued_s for t in later) >= 0.01  # they waited for the first call (20 ms) to finish


def test_statistics_add_up_to_each_request_and_count_calls_once() -> None:
    from service.batching import Timed
    from service.statistics import Statistics

    stats = Statistics(clock=lambda: 1234.5)
    call = {"outputs": np.zeros((3, 1)), "context": "v", "infer_s": 0.004, "ended": 10.010, "batch_size": 3}
    for first, queued, samples in ((True, 0.001, 1), (False, 0.002, 2)):
        timed = Timed(**call, queued_s=queued, first=first)  # type: ignore[arg-type]
        stats.answered("m", "abc", samples=samples, received=10.0, submitted=10.0045, timed=timed, done=10.012)
    stats.failed("m", "abc", seconds=0.5)
    (report,) = stats.report([("m", "abc", "3")])
    assert (report["name"], report["version"], report["last_inference"]) == ("m", "3", 1234500)
    assert (report["inference_count"], report["execution_count"]) == (3, 1)
    durations = report["inference_stats"]
    assert durations["success"] == {"count": 2, "ns": 24_000_000}
    assert durations["compute_input"] == {"count": 2, "ns": 9_000_000}
    assert durations["queue"] == {"count": 2, "ns": 3_000_000}
    assert durations["compute_infer"] == {"count": 2, "ns": 8_000_000}
    assert durations["compute_output"] == {"count": 2, "ns": 4_000_000}
    assert durations["fail"] == {"count": 1, "ns": 500_000_000}
    assert report["batch_stats"] == [{"batch_size": 3, "compute_infer": {"count": 1, "ns": 4_000_000}}]
    assert stats.report([("m", "other", "1")])[0]["inference_count"] == 0


def test_statistics_sum_what_the_other_workers_shared() -> None:
    import json

    from service.batching import Timed
    from service.statistics import Statistics

    def worker(samples: int, batch: int, seconds: float) -> Statistics:
        stats = Statistics(clock=lambda: seconds)
        timed = Timed(np.zeros((samples, 1)), "v", 0.001, 0.002, 1.003, batch, True)
        stats.answered("m", "abc", samples=samples, received=1.0, submitted=1.0, timed=timed, done=1.004)
        return stats

    here, there, elsewhere = worker(1, 1, 5.0), worker(2, 2, 7.0), worker(3, 2, 6.0)
    elsewhere.answered(
        "n", "xyz", samples=1, received=0, submitted=0, timed=Timed(np.zeros(1), "v", 0, 0, 0, 1, True), done=0
    )
    shared = [json.loads(json.dumps(s.snapshot())) for s in (there, elsewhere)]  # as Redis carries them
    assert here.versions("m", shared) == ["abc"] and here.versions("n", shared) == ["xyz"]
    (m,) = here.report([("m", "abc", "1")], shared)
    assert (m["inference_count"], m["execution_count"], m["last_inference"]) == (6, 3, 7000)
    assert m["inference_stats"]["success"] == {"count": 3, "ns": 3 * 4_000_000}
    assert m["batch_stats"] == [{"batch_size": 1, "compute_infer": {"count": 1, "ns": 2_000_000}},
                                {"batch_size": 2, "compute_infer": {"count": 2, "ns": 4_000_000}}]  # fmt: skip
    assert here.report([("m", "abc", "1")])[0]["inference_count"] == 1  # alone: its own
