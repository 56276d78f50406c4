"""Dead letters: an entry the ingest worker cannot store is an alert, and can be replayed once fixed."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import numpy as np
import psycopg
import pytest
import redis

from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.predictions import dead_letters
from feedback.predictions.ingest import IngestConfig, IngestWorker
from feedback.predictions.records import PredictionRecord, encode
from tests.conftest import REDIS
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration


def record(**overrides: object) -> PredictionRecord:
    fields: dict[str, object] = {
        "id": uuid7(), "model_name": "digits-cnn", "model_version": "v1",
        "input": np.ones((8, 8), np.float32), "scores": np.full(10, 0.1, np.float32),
        "label": "3", "confidence": 0.1, "request_id": "r",
    }  # fmt: skip
    fields.update(overrides)
    return PredictionRecord(**fields)  # type: ignore[arg-type]


def ingest(client: redis.Redis, keys: Keys, database_url: str) -> IngestWorker:
    """The rounds `loop ingest` runs, until one finds nothing."""
    worker = IngestWorker(
        redis_client=client, connect=lambda: psycopg.connect(database_url, autocommit=True), keys=keys, consumer="t",
        config=IngestConfig(block_ms=10),
    )  # fmt: skip
    while worker.step():
        pass
    worker.close()
    return worker


def loop(*args: str, keys: Keys) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOOP_REDIS_URL": REDIS, "LOOP_REDIS_PREFIX": keys.prefix}
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def stored(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {r[0] for r in conn.execute("SELECT id::text FROM predictions").fetchall()}


def test_a_refused_entry_is_an_alert_and_replays_once_fixed(
    keys: Keys, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(REDIS)
    good, refused = record(), record(tags={"a": "x\x00y"})  # as an older service would have let in
    client.xadd(keys.stream, encode(good))  # type: ignore[arg-type]
    client.xadd(keys.stream, encode(refused))  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="feedback.ingest"):
        worker = ingest(client, keys, database_url)
    assert worker.stats.dead == 1 and worker.stats.ingested == 1
    assert any(r.levelno == logging.ERROR and "loop dead-letters" in r.getMessage() for r in caplog.records)
    assert stored(database_url) == {str(good.id)}

    listed = loop("dead-letters", "list", keys=keys)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    _, prediction_id, reason = line.split("\t")
    assert prediction_id == str(refused.id) and "refused by Postgres" in reason
    assert "1 dead letters" in listed.stderr

    # The cause fixed (here: the entry repaired in place, as a migration of the stored fields
    # would), a replay puts it back on the stream and the worker stores it once.
    (letter,) = dead_letters.read(client, keys)
    repaired = {**letter.fields, b"g": b'{"a":"xy"}'}
    client.delete(keys.dead_letters)
    client.xadd(keys.dead_letters, dead_letters.dead_fields(repaired, entry_id=letter.source_id.encode(), reason="r"))  # type: ignore[arg-type]
    assert loop("dead-letters", "replay", keys=keys).returncode != 0  # names or --all, not neither
    assert "no dead letter 1-1" in loop("dead-letters", "replay", "1-1", keys=keys).stderr
    replayed = loop("dead-letters", "replay", "--all", keys=keys)
    assert replayed.returncode == 0 and "replayed 1 entries" in replayed.stdout, replayed.stderr
    assert dead_letters.count(client, keys) == 0
    ingest(client, keys, database_url)
    assert stored(database_url) == {str(good.id), str(refused.id)}
    # Replaying what is already stored doubles nothing.
    client.xadd(keys.dead_letters, dead_letters.dead_fields(repaired, entry_id=b"0-1", reason="again"))  # type: ignore[arg-type]
    assert dead_letters.replay(client, keys) == 1
    assert ingest(client, keys, database_url).stats.duplicates == 1
    assert len(stored(database_url)) == 2
    client.close()


def dead_letter_gauge(url: str) -> float | None:
    found = re.search(r"^loop_dead_letters(?:\{[^}]*\})? (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return None if found is None else float(found.group(1))


def test_the_service_exposes_the_dead_letter_count_for_alerts(
    start_service: Callable[..., RunningService], keys: Keys
) -> None:
    service = start_service()
    client = redis.Redis.from_url(REDIS)
    try:
        client.xadd(keys.dead_letters, dead_letters.dead_fields(encode(record()), entry_id=b"1-1", reason="test"))  # type: ignore[arg-type]
        deadline = time.monotonic() + 20
        while dead_letter_gauge(service.url) != 1.0:
            assert time.monotonic() < deadline, "loop_dead_letters never showed the dead letter"
            time.sleep(0.5)
    finally:
        client.close()
