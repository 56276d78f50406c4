"""The prediction log's append step by step, one stream entry a record (as before packs) and
packed, in one run.

    python -m benchmarks.bench_log_append --tick 32 --ticks 1500 --rounds 5

A tick is the records of `--tick` single-digit requests answered in one moment. Each step is
timed both ways on the machine's Redis (a fresh key prefix, deleted afterwards), rounds
alternating; the table gives the median microseconds per record and the ratio after / before:

- record, encode, pack: building the records, their stream fields, and the pack (packed only);
- write: the tick to Redis (a pipeline of XADDs, or one XADD), client time and Redis's own;
- read + decode: the ingest worker's half (XRANGE of the stream, unpack, decode to rows);
- append: `PredictionLog.append` itself, 64 concurrent appenders (client CPU per record, and
  records a second), and one appender alone (p50 latency).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis

import harness
from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.predictions.log import PACK_RECORDS, PredictionLog, packed
from feedback.predictions.records import PredictionRecord, decode_entry, encode, unpack

logger = logging.getLogger("bench_log_append")

WAYS = {"before": 1, "after": PACK_RECORDS}  # records a stream entry may hold


def tick_records(n: int, rng: np.random.Generator) -> list[PredictionRecord]:
    scores = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    return [
        PredictionRecord(
            id=uuid7(),
            model_name="digits-cnn",
            model_version="bench",
            input=rng.uniform(0, 16, (8, 8)).astype(np.float32),
            scores=scores[i],
            label=str(int(scores[i].argmax())),
            confidence=float(scores[i].max()),
            request_id=f"bench-{i}",
        )
        for i in range(n)
    ]


def per_record(action: Callable[[], object], records: int, reps: int) -> float:
    """Microseconds per record of `action`, which handles `records` records."""
    started = time.perf_counter()
    for _ in range(reps):
        action()
    return (time.perf_counter() - started) / reps / records * 1e6


def steps(
    client: redis.Redis, keys: Keys, records: list[PredictionRecord], ticks: int, pack_records: int
) -> dict[str, float]:
    n = len(records)
    fields = [encode(r) for r in records]
    batch = np.stack([r.input for r in records])
    scores = np.stack([r.scores for r in records])

    def build() -> list[PredictionRecord]:  # as the service makes them from a batch it answered
        return [
            PredictionRecord(
                id=uuid7(),
                model_name="digits-cnn",
                model_version="bench",
                input=batch[i],
                scores=scores[i],
                label=records[i].label,
                confidence=float(scores[i].max()),
                request_id=records[i].request_id,
            )
            for i in range(n)
        ]

    out = {
        "record": per_record(build, n, ticks),
        "encode": per_record(lambda: [encode(r) for r in records], n, ticks),
        "pack": per_record(lambda: packed(fields, pack_records), n, ticks) if pack_records > 1 else 0.0,
    }
    entries = packed(fields, pack_records)
    client.delete(keys.stream)
    client.config_resetstat()

    def write() -> None:
        pipe = client.pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(keys.stream, entry)  # type: ignore[arg-type]
        pipe.execute()

    out["write (client)"] = per_record(write, n, ticks)
    stats: Any = client.info("commandstats")
    out["write (Redis)"] = stats["cmdstat_xadd"]["usec"] / (ticks * n)

    def xrange(cursor: str) -> Any:
        return client.xrange(keys.stream, min=cursor, count=2000)

    def read() -> None:
        cursor = "-"
        while page := xrange(cursor):
            for _, entry in page:
                for part in unpack(entry):
                    decode_entry(part)
            cursor = "(" + page[-1][0].decode()

    out["read + decode"] = per_record(read, n * ticks, 1)
    client.delete(keys.stream)
    return out


async def appends(url: str, keys: Keys, pack_records: int, count: int) -> dict[str, float]:
    log = PredictionLog(url, keys=keys, spool_dir=Path(tempfile.mkdtemp()), writer="bench", pack_records=pack_records)
    rng = np.random.default_rng(1)
    pool = tick_records(256, rng)
    try:

        async def appender(k: int, n: int) -> None:
            for i in range(n):
                await log.append([pool[(k + i) % len(pool)]])

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(appender(k, count // 64) for k in range(64)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        latencies = []
        for i in range(count // 10):
            started = time.perf_counter()
            await log.append([pool[i % len(pool)]])
            latencies.append(time.perf_counter() - started)
    finally:
        await log.close()
        await aioredis.Redis.from_url(url).delete(keys.stream)
    done = count // 64 * 64
    return {
        "append, c=64 (client CPU)": cpu / done * 1e6,
        "append, c=64 (records/s)": done / wall,
        "append, c=1 (p50 µs)": statistics.median(latencies) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tick", type=int, default=32, help="records answered in one moment")
    parser.add_argument("--ticks", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    client = redis.Redis.from_url(args.redis)
    keys = Keys(harness.new_prefix())
    records = tick_records(args.tick, np.random.default_rng(0))
    results: dict[str, dict[str, list[float]]] = {way: {} for way in WAYS}
    for round_ in range(args.rounds):
        for way, pack_records in WAYS.items():
            figures = steps(client, keys, records, args.ticks, pack_records)
            figures |= asyncio.run(appends(args.redis, keys, pack_records, 64 * args.ticks // 10))
            for step, value in figures.items():
                results[way].setdefault(step, []).append(value)
        logger.info("round %d of %d done", round_ + 1, args.rounds)
    print(f"\n{args.tick} records a tick, median of {args.rounds} rounds (µs per record unless named)\n")
    print("| step | one entry a record | packed | packed / one a record |\n|---|---|---|---|")
    for step in results["before"]:
        before, after = (statistics.median(results[way][step]) for way in WAYS)
        ratio = f"{after / before:.2f}" if before else ""
        print(f"| {step} | {before:,.1f} | {after:,.1f} | {ratio} |")


if __name__ == "__main__":
    main()
