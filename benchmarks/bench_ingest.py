"""Ingest throughput: predictions per second from the Redis stream into Postgres, one worker.

    python -m benchmarks.bench_ingest --records 200000

Fills a stream (under a fresh key prefix) with synthetic digit predictions, then times one
ingest worker draining it into a fresh database, and drops both afterwards. Needs Postgres and
Redis (by default the machine's, on their standard ports).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import numpy as np
import psycopg
import redis

import harness
from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.migrate import migrate
from feedback.predictions.ingest import IngestConfig, IngestWorker, lag
from feedback.predictions.records import PredictionRecord, encode

logger = logging.getLogger("bench_ingest")


def fill(client: redis.Redis, keys: Keys, records: int, chunk: int = 5000) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(256, 8, 8)).astype(np.float32)
    scores = rng.dirichlet(np.ones(10), size=256).astype(np.float32)
    for start in range(0, records, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + chunk, records)):
            record = PredictionRecord(
                id=uuid7(),
                model_name="digits-cnn",
                model_version="bench",
                input=images[i % 256],
                scores=scores[i % 256],
                label=str(int(scores[i % 256].argmax())),
                confidence=float(scores[i % 256].max()),
                request_id=f"bench-{i // 8}",
                tags={"bench": "1"} if i % 4 == 0 else {},
            )
            pipe.xadd(keys.stream, encode(record))  # type: ignore[arg-type]
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=IngestConfig.batch_size)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    keys = Keys(harness.new_prefix())
    client = redis.Redis.from_url(args.redis)
    database, url = harness.create_database(args.postgres)
    try:
        with psycopg.connect(url) as conn:
            migrate(conn)
        started = time.perf_counter()
        fill(client, keys, args.records)
        logger.info("filled %d entries in %.1f s", args.records, time.perf_counter() - started)
        worker = IngestWorker(
            redis_client=client,
            connect=lambda: psycopg.connect(url, autocommit=True),
            keys=keys,
            consumer="bench",
            config=IngestConfig(batch_size=args.batch_size, block_ms=50),
        )
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,))
        started = time.perf_counter()
        thread.start()
        while worker.stats.ingested < args.records:
            if not thread.is_alive():
                raise SystemExit("the ingest worker died; see the traceback above")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        thread.join()
        with psycopg.connect(url) as conn:
            size = conn.execute("SELECT pg_total_relation_size('predictions')").fetchone()
        bytes_per_row = (size[0] if size else 0) / args.records
        logger.info("lag after: %s", lag(client, keys))
        print(
            f"ingested {args.records} predictions in {elapsed:.2f} s: {args.records / elapsed:,.0f}/s "
            f"(one worker, batch {args.batch_size}); {bytes_per_row:.0f} bytes per stored prediction"
        )
    finally:
        harness.delete_keys(args.redis, keys.prefix)
        harness.drop_database(args.postgres, database)


if __name__ == "__main__":
    main()
