"""A model's shadow in a worker (`service.shadowing`), in-process against the session's trained
model and the machine's Redis: it sees answered batches after the answer, and nothing it does
(failing, hanging) changes or holds up an answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from feedback.keys import Keys
from feedback.predictions.log import PredictionLog
from feedback.predictions.records import SHADOWS, ShadowRow, decode_entry, unpack
from models import digits
from models.pipeline import BuildResult
from models.runtime import DevicePreference
from service.predictions import Predictions
from service.serving import ModelSlot, Where
from service.shadowing import FAILURES_TO_STOP, Shadowing
from tests.conftest import REDIS

pytestmark = pytest.mark.api


@pytest.fixture
async def plane(trained_model: BuildResult, keys: Keys, tmp_path: Path) -> AsyncIterator[Predictions]:
    where = Where(database_url=None, redis_url=REDIS, keys=keys, device=DevicePreference.CPU, ort_threads=1,
                  max_batch_size=64, max_latency_s=1.0)  # fmt: skip
    slot = ModelSlot(trained_model.stored.name, trained_model.stored.version, where)
    slot.start_loading()
    await asyncio.to_thread(slot.loaded.wait, 60)
    assert slot.served is not None, slot.load_error
    plane = Predictions({slot.name: slot}, max_samples=64, log_required=True)
    plane.log = PredictionLog(REDIS, keys=keys, spool_dir=tmp_path / "spool", writer="test")
    try:
        yield plane
    finally:
        for shadowing in plane.shadows.values():
            await shadowing.close()
        await slot.close()
        await plane.log.close()


def shadow_of(plane: Predictions, **options: Any) -> Shadowing:
    slot = plane.default
    assert slot.served is not None
    shadowing = Shadowing(slot.name, slot.served.stored.version, 1.0, slot.where, plane.log, **options)
    plane.shadows[slot.name] = shadowing
    shadowing.start()
    return shadowing


async def answers(plane: Predictions, images: np.ndarray, request: str) -> list[tuple[str, list[float]]]:
    """Each request's labels and scores, one request per image (the ids differ each time)."""
    answered = [await plane.classify(None, [image.tolist()], {}, f"{request}-{i}") for i, image in enumerate(images)]
    return [(p.label, list(p.scores.values())) for a in answered for p in a.predictions]


async def wait_for(condition: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_shadow_sees_every_answered_sample_and_changes_no_answer(plane: Predictions, keys: Keys) -> None:
    images = digits.load().images[:24]
    without = await answers(plane, images, "plain")
    shadowing = shadow_of(plane)
    answered = [await plane.classify(None, [image.tolist()], {}, f"shadowed-{i}") for i, image in enumerate(images)]
    assert [(p.label, list(p.scores.values())) for a in answered for p in a.predictions] == without
    await wait_for(lambda: shadowing.counts.stored == len(images))
    with redis.Redis.from_url(REDIS) as client:
        entries = [part for _, fields in client.xrange(keys.stream) for part in unpack(fields)]  # packs too
    shadow_rows = [
        row for f in entries if f.get(b"k") == SHADOWS for row in decode_entry(f) if isinstance(row, ShadowRow)
    ]
    # Under the answered prediction's id and request id, with the shadow's outputs (here the same model's).
    expected = {(str(p.id), a.request_id, p.label) for a in answered for p in a.predictions}
    assert {(str(r.id), r.request_id, r.label) for r in shadow_rows} == expected
    # Each sample with both models' call times.
    assert all(r.answer_ms is not None and r.answer_ms > 0 and r.shadow_ms and r.shadow_ms > 0 for r in shadow_rows)
    assert (shadowing.counts.mirrored, shadowing.counts.dropped, shadowing.counts.failed) == (len(images), 0, 0)


async def test_a_share_is_a_share(plane: Predictions) -> None:
    draws = iter([0.1, 0.9] * 10)
    shadowing = shadow_of(plane)
    shadowing.share, shadowing.draw = 0.5, lambda: next(draws)
    await answers(plane, digits.load().images[:20], "half")
    await wait_for(lambda: shadowing.counts.stored == 10)
    assert shadowing.counts.mirrored == 10


async def test_a_failing_shadow_stops_itself_and_no_answer_fails(plane: Predictions) -> None:
    stops: list[tuple[str, str]] = []

    async def record(model_name: str, reason: str) -> None:
        stops.append((model_name, reason))

    shadowing = shadow_of(plane, on_stop=record)

    def broken(batch: np.ndarray) -> Any:
        raise RuntimeError("the shadow's graph is broken")

    shadowing.slot._infer = broken  # type: ignore[method-assign]
    images = digits.load().images[:10]
    for i, image in enumerate(images):
        assert (await plane.classify(None, [image.tolist()], {}, f"r{i}")).predictions
        await asyncio.sleep(0.05)  # one shadow call at a time, so that each failure counts
    await wait_for(lambda: stops != [])
    assert stops[0][0] == plane.default.name and "the shadow's graph is broken" in stops[0][1]
    assert shadowing.stopped is not None and shadowing.counts.failed >= FAILURES_TO_STOP
    mirrored = shadowing.counts.mirrored
    await answers(plane, images, "after")  # a stopped shadow is offered nothing
    assert shadowing.counts.mirrored == mirrored


async def test_a_hanging_shadow_holds_up_no_answer(plane: Predictions) -> None:
    stops: list[str] = []

    async def record(_model_name: str, reason: str) -> None:
        stops.append(reason)

    release = threading.Event()
    shadowing = shadow_of(plane, on_stop=record, call_timeout_s=0.3)
    real = shadowing.slot._infer

    def hanging(batch: np.ndarray) -> Any:
        release.wait(30)
        return real(batch)

    shadowing.slot._infer = hanging  # type: ignore[method-assign]
    try:
        images = digits.load().images[:40]
        # Every answer comes while the shadow's first call is still hanging.
        assert len(await answers(plane, images, "hung")) == len(images)
        assert not release.is_set() and shadowing.counts.stored == 0
        deadline = time.monotonic() + 30
        while not stops:  # traffic goes on; each call the shadow cannot answer counts
            assert time.monotonic() < deadline, "the hanging shadow was never stopped"
            await answers(plane, images[:1], "more")
            await asyncio.sleep(0.1)
        assert "no answer within the call timeout" in stops[0]
    finally:
        release.set()
