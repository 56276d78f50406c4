"""The prediction log against real servers, in-process: append, ingest, dead letters, claims,
and outages of throwaway Postgres and Redis servers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from feedback.ids import uuid7
from feedback.keys import INGEST_GROUP, Keys
from feedback.migrate import available, migrate
from feedback.predictions import dead_letters, store
from feedback.predictions.ingest import IngestConfig, IngestWorker, ensure_group, lag
from feedback.predictions.log import PACK_RECORDS, STREAM_CHECK_S, Destination, PredictionLog
from feedback.predictions.records import PredictionRecord, ShadowBatch, encode, held, pack
from harness import free_port
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.conftest import REDIS

pytestmark = pytest.mark.integration


def make_records(n: int) -> list[PredictionRecord]:
    rng = np.random.default_rng(0)
    return [
        PredictionRecord(
            id=uuid7(),
            model_name="digits-cnn",
            model_version="v1",
            input=rng.uniform(0, 16, size=(8, 8)).astype(np.float32),
            scores=np.full(10, 0.1, dtype=np.float32),
            label=str(i % 10),
            confidence=0.1,
            request_id=f"req-{i // 10}",
            tags={"i": str(i)} if i % 3 == 0 else {},
        )
        for i in range(n)
    ]


def stored_ids(database_url: str) -> list[uuid.UUID]:
    with psycopg.connect(database_url) as conn:
        return list(store.prediction_ids(conn=conn))


def wait_for(condition: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class WorkerThread:
    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=worker.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture
def start_worker(database_url: str, keys: Keys) -> Iterator[Callable[..., WorkerThread]]:
    running: list[WorkerThread] = []

    def start(consumer: str = "w1", redis_url: str = REDIS, db: str | None = None, **config: int) -> WorkerThread:
        worker = IngestWorker(
            redis_client=redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2),
            connect=lambda: psycopg.connect(db or database_url, autocommit=True, connect_timeout=2),
            keys=keys,
            consumer=consumer,
            config=IngestConfig(block_ms=100, housekeeping_every_s=0.2, **config),
        )
        running.append(WorkerThread(worker))
        return running[-1]

    yield start
    for w in running:
        w.close()


async def append_all(log: PredictionLog, records: list[PredictionRecord], per_request: int = 10) -> set[Destination]:
    chunks = [records[i : i + per_request] for i in range(0, len(records), per_request)]
    return set(await asyncio.gather(*(log.append(c) for c in chunks)))


def test_migrations_apply_once(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert migrate(conn) == []  # the fixture applied them already
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == [m.version for m in available()]


def test_appended_records_are_ingested_once_and_trimmed(
    keys: Keys, database_url: str, tmp_path: Path, start_worker: Callable[..., WorkerThread]
) -> None:
    records = make_records(3000)

    async def produce() -> set[Destination]:
        log = PredictionLog(REDIS, keys=keys, spool_dir=tmp_path, writer="w")
        try:
            return await append_all(log, records)
        finally:
            await log.close()

    assert asyncio.run(produce()) == {Destination.REDIS}
    client = redis.Redis.from_url(REDIS)
    stream: Any = client.xrange(keys.stream)
    entries = [fields for _, fields in stream]
    assert sum(map(held, entries)) == 3000
    assert len(entries) == 3000 // PACK_RECORDS + 1  # appended together, so packed
    worker = start_worker()
    wait_for(lambda: lag(client, keys)[0] == 0, what="the stream to drain")
    ids = stored_ids(database_url)
    assert sorted(ids) == sorted(r.id for r in records)  # equal sets, no duplicates
    assert worker.worker.stats.ingested == 3000
    wait_for(lambda: client.xlen(keys.stream) == 0, what="acknowledged entries to be trimmed")
    with psycopg.connect(database_url) as conn:
        row = store.get_prediction(conn=conn, prediction_id=records[3].id)
    assert row is not None and row.tags == {"i": "3"} and row.label == "3"


def test_redelivered_entries_are_not_stored_twice(
    keys: Keys, database_url: str, start_worker: Callable[..., WorkerThread]
) -> None:
    records = make_records(200)
    client = redis.Redis.from_url(REDIS)
    for r in records + records[:50]:  # the spool replay or a retried pipeline can repeat entries
        client.xadd(keys.stream, encode(r))  # type: ignore[arg-type]
    worker = start_worker()
    wait_for(lambda: lag(client, keys)[0] == 0, what="the stream to drain")
    assert sorted(stored_ids(database_url)) == sorted(r.id for r in records)
    assert worker.worker.stats.duplicates == 50


def shadows_of(records: list[PredictionRecord], version: str = "v-shadow") -> ShadowBatch:
    """A shadow's call on the samples of `records`: the next label to each answer's."""
    return ShadowBatch(
        ids=[r.id for r in records], model_name=records[0].model_name, model_version=version,
        scores=np.full((len(records), 10), 0.1, np.float32), labels=[str((int(r.label) + 1) % 10) for r in records],
        confidences=np.full(len(records), 0.3, np.float32), request_ids=[r.request_id for r in records],
    )  # fmt: skip


def test_shadow_entries_are_stored_once_beside_their_predictions(
    keys: Keys, database_url: str, start_worker: Callable[..., WorkerThread]
) -> None:
    records = make_records(300)
    calls = [shadows_of(records[i : i + 40]) for i in range(0, 200, 40)]  # five calls of the shadow
    client = redis.Redis.from_url(REDIS)
    # Interleaved as the service writes them, with repeats (a spool replay), and one shadow entry
    # that cannot be stored (scores of another length): dead-lettered, the rest stored.
    broken = {**encode(calls[0]), b"s": b"\x00" * 12}
    for entry in [*map(encode, records[:100]), *map(encode, calls), *map(encode, records[100:]),
                  *map(encode, calls[:2]), broken]:  # fmt: skip
        client.xadd(keys.stream, entry)  # type: ignore[arg-type]
    worker = start_worker()
    wait_for(lambda: lag(client, keys)[0] == 0, what="the stream to drain")
    assert sorted(stored_ids(database_url)) == sorted(r.id for r in records)
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT prediction_id, model_version, label, request_id FROM shadow_predictions ORDER BY prediction_id"
        ).fetchall()
    expected = [(i, "v-shadow", label, request) for call in calls
                for i, label, request in zip(call.ids, call.labels, call.request_ids, strict=True)]  # fmt: skip
    assert stored == sorted(expected)
    assert worker.worker.stats.ingested == 500 and worker.worker.stats.dead == 1
    assert client.xlen(keys.dead_letters) == 1

    async def fetched(prediction_id: uuid.UUID) -> store.StoredPrediction | None:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            return await store.fetch_prediction(conn=conn, prediction_id=prediction_id)

    shadowed, alone = asyncio.run(fetched(records[1].id)), asyncio.run(fetched(records[250].id))
    assert shadowed is not None and [(s.model_version, s.label) for s in shadowed.shadows] == [
        ("v-shadow", calls[0].labels[1])]  # fmt: skip
    assert alone is not None and alone.shadows == ()


def test_malformed_entries_go_to_dead_letters(
    keys: Keys, database_url: str, start_worker: Callable[..., WorkerThread]
) -> None:
    good = make_records(20)
    client = redis.Redis.from_url(REDIS)
    broken = encode(make_records(1)[0])
    broken[b"x"] = b"garbage"
    bad_entries: list[dict[bytes, bytes]] = [{b"hello": b"world"}, broken, {b"id": b"not-a-uuid"}]
    for i, r in enumerate(good):
        client.xadd(keys.stream, encode(r))  # type: ignore[arg-type]
        if i < len(bad_entries):
            client.xadd(keys.stream, bad_entries[i])  # type: ignore[arg-type]
    start_worker()
    wait_for(lambda: lag(client, keys)[0] == 0, what="the stream to drain")
    assert sorted(stored_ids(database_url)) == sorted(r.id for r in good)
    dead: Any = client.xrange(keys.dead_letters)
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert len(reasons) == 3
    assert any("missing fields" in r for r in reasons)
    assert any("not .npy" in r for r in reasons)
    assert all(b"source_id" in fields for _, fields in dead)


def test_a_pack_stores_its_good_entries_and_dead_letters_each_bad_one_alone(
    keys: Keys, database_url: str, start_worker: Callable[..., WorkerThread]
) -> None:
    good = make_records(30)
    undecodable = encode(make_records(1)[0]) | {b"x": b"garbage"}
    refused = encode(make_records(1)[0]) | {b"g": b'{"a":"x\\u0000y"}'}  # Postgres takes no NUL
    client = redis.Redis.from_url(REDIS)
    entries = [encode(r) for r in good]
    pack_id: Any = client.xadd(keys.stream, pack([*entries[:10], undecodable, *entries[10:20], refused, *entries[20:]]))  # type: ignore[arg-type]
    client.xadd(keys.stream, pack([entries[0], entries[5]]) | {b"n": b"3"})  # type: ignore[arg-type]
    worker = start_worker()
    wait_for(lambda: lag(client, keys)[0] == 0, what="the stream to drain")
    assert sorted(stored_ids(database_url)) == sorted(r.id for r in good)
    assert worker.worker.stats.dead == 3 and worker.worker.stats.ingested == 30
    letters = {letter.reason.split(":")[0]: letter for letter in dead_letters.read(client, keys)}
    # Each bad entry of the first pack alone, known by its prediction id and the pack's entry id.
    assert letters["input is not .npy data"].fields == undecodable
    assert letters["refused by Postgres"].fields == refused
    assert {letters[k].source_id for k in ("input is not .npy data", "refused by Postgres")} == {pack_id.decode()}
    assert letters["a pack's field b'id' does not describe 3 entries"].prediction_id is None  # the whole pack


def test_a_record_in_a_pack_is_found_before_it_is_ingested(keys: Keys, tmp_path: Path) -> None:
    records = make_records(40)

    async def append_and_find() -> list[PredictionRecord | None]:
        log = PredictionLog(REDIS, keys=keys, spool_dir=tmp_path, writer="w")
        try:
            await append_all(log, records, per_request=1)
            await log.append([shadows_of(records[:5])])
            return [await log.find(r.id) for r in (records[0], records[17], records[39])]
        finally:
            await log.close()

    found = asyncio.run(append_and_find())
    assert redis.Redis.from_url(REDIS).xlen(keys.stream) == 2  # the forty in one pack
    assert [f.id if f else None for f in found] == [records[0].id, records[17].id, records[39].id]
    assert found[1] is not None and found[1].label == records[17].label
    np.testing.assert_array_equal(found[1].input, records[17].input)


def test_entries_of_a_dead_consumer_are_claimed(
    keys: Keys, database_url: str, start_worker: Callable[..., WorkerThread]
) -> None:
    records = make_records(100)
    client = redis.Redis.from_url(REDIS)
    for r in records:
        client.xadd(keys.stream, encode(r))  # type: ignore[arg-type]
    ensure_group(client, keys)
    # A consumer reads everything and dies before acknowledging.
    client.xreadgroup(INGEST_GROUP, "dead-consumer", {keys.stream: ">"}, count=1000)
    assert client.xpending(keys.stream, INGEST_GROUP)["pending"] == 100
    worker = start_worker(consumer="heir", claim_idle_ms=300)
    wait_for(lambda: lag(client, keys)[0] == 0, what="the abandoned entries to be claimed")
    assert sorted(stored_ids(database_url)) == sorted(r.id for r in records)
    assert worker.worker.stats.claimed == 100


def test_postgres_outage_delays_but_loses_nothing(
    keys: Keys, shared_tmp: Path, start_worker: Callable[..., WorkerThread]
) -> None:
    server = EmbeddedPostgres(shared_tmp / "pg", free_port())
    try:
        url = server.start()
        with psycopg.connect(url) as conn:
            migrate(conn)
        client = redis.Redis.from_url(REDIS)
        start_worker(db=url)
        first, second = make_records(500), make_records(500)
        for r in first:
            client.xadd(keys.stream, encode(r))  # type: ignore[arg-type]
        wait_for(lambda: lag(client, keys)[0] == 0, what="the first half")
        server.stop("immediate")  # as if it crashed
        for r in second:
            client.xadd(keys.stream, encode(r))  # type: ignore[arg-type]
        time.sleep(1.0)
        assert lag(client, keys)[0] >= 500  # nothing acknowledged while Postgres is down
        server.start()
        wait_for(lambda: lag(client, keys)[0] == 0, what="the second half after Postgres returned")
        assert sorted(stored_ids(url)) == sorted(r.id for r in first + second)
    finally:
        server.stop()


def test_redis_outage_spools_then_replays_exactly_once(
    keys: Keys, database_url: str, tmp_path: Path, start_worker: Callable[..., WorkerThread]
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port())
    try:
        url = server.start()
        client = redis.Redis.from_url(url)
        before, during, after = make_records(300), make_records(300), make_records(300)

        async def produce() -> list[set[Destination]]:
            log = PredictionLog(url, keys=keys, spool_dir=tmp_path / "spool", writer="w", retry_after_s=0.2)
            try:
                outcomes = [await append_all(log, before)]
                server.stop()
                outcomes.append(await append_all(log, during))
                server.start()
                await asyncio.sleep(0.3)
                assert await log.replay() == 300
                outcomes.append(await append_all(log, after))
                return outcomes
            finally:
                await log.close()

        outcomes = asyncio.run(produce())
        assert outcomes == [{Destination.REDIS}, {Destination.SPOOL}, {Destination.REDIS}]
        assert list((tmp_path / "spool").glob("*.sealed")) == []
        start_worker(redis_url=url)
        wait_for(lambda: lag(client, keys)[0] == 0, what="ingest")
        assert sorted(stored_ids(database_url)) == sorted(r.id for r in before + during + after)
    finally:
        server.stop()


def test_a_full_stream_spools_until_the_ingest_worker_makes_room(
    keys: Keys, database_url: str, tmp_path: Path, start_worker: Callable[..., WorkerThread]
) -> None:
    client = redis.Redis.from_url(REDIS)
    first, second, third = make_records(1000), make_records(300), make_records(300)
    bound = 64 << 10  # the first thousand records (about 0.5 MB) are past it

    async def produce() -> list[set[Destination]]:
        log = PredictionLog(REDIS, keys=keys, spool_dir=tmp_path / "spool", writer="w", max_stream_bytes=bound)
        try:
            outcomes = [await append_all(log, first)]  # the stream was empty: in
            memory = client.memory_usage(keys.stream)
            assert memory is not None and memory > bound
            await asyncio.sleep(STREAM_CHECK_S)
            outcomes.append(await append_all(log, second))  # full: spooled, none lost
            assert await log.replay() == 0  # the spool waits while the stream is full
            worker = start_worker()
            wait_for(lambda: client.xlen(keys.stream) == 0, what="the worker to store and trim the stream")
            await asyncio.sleep(STREAM_CHECK_S)
            assert await log.replay() == 300
            outcomes.append(await append_all(log, third))
            wait_for(lambda: lag(client, keys)[0] == 0, what="ingest")
            assert worker.worker.stats.ingested == 1600
            return outcomes
        finally:
            await log.close()

    outcomes = asyncio.run(produce())
    assert outcomes == [{Destination.REDIS}, {Destination.SPOOL}, {Destination.REDIS}]
    assert sorted(stored_ids(database_url)) == sorted(r.id for r in first + second + third)  # once each
