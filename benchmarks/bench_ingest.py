"""Ingest throughput and the log's per-unit costs: predictions per second from the Redis stream
into Postgres (one worker), Redis bytes per record waiting in the stream, Postgres bytes per stored
prediction.

    python -m benchmarks.bench_ingest --records 200000
    python -m benchmarks.bench_ingest --records 20000 --image-kb 50
    python -m benchmarks.bench_ingest --records 20000 --image-kb 8 --blob-url /tmp/bench-blobs

Fills a stream (under a fresh key prefix) with synthetic predictions, packed as the service
appends them (`--pack` records an entry): digits (8x8 .npy inputs), or with `--image-kb` PNGs of
about that size. Then times one ingest worker draining it into a fresh (partitioned) database,
and drops both afterwards. Needs Postgres and Redis (by default the machine's, on their standard
ports).
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import redis
from PIL import Image

import harness
from feedback.ids import uuid7
from feedback.keys import Keys
from feedback.migrate import migrate
from feedback.predictions import blobs
from feedback.predictions.blobs import BlobStore
from feedback.predictions.ingest import IngestConfig, IngestWorker, lag
from feedback.predictions.log import PACK_BYTES, PACK_RECORDS
from feedback.predictions.records import PredictionRecord, encode, pack
from models import store

logger = logging.getLogger("bench_ingest")


def pngs(kilobytes: int, n: int = 16) -> list[bytes]:
    """`n` PNGs of random pixels (incompressible) of about `kilobytes` KB each."""
    rng = np.random.default_rng(1)
    side = max(int((kilobytes * 1024 / 3) ** 0.5), 1)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def fill(
    client: redis.Redis, keys: Keys, records: int, *, pack_size: int, images: list[bytes] | None, version: str = "bench"
) -> None:
    rng = np.random.default_rng(0)
    tensors = rng.integers(0, 17, size=(256, 8, 8)).astype(np.float32)
    scores = rng.dirichlet(np.ones(10), size=256).astype(np.float32)
    for start in range(0, records, pack_size * 8):
        pipe = client.pipeline(transaction=False)
        for first in range(start, min(start + pack_size * 8, records), pack_size):
            entries = []
            for i in range(first, min(first + pack_size, records)):
                record = PredictionRecord(
                    id=uuid7(),
                    model_name="digits-cnn" if images is None else "images",
                    model_version=version,
                    input=tensors[i % 256],
                    scores=scores[i % 256],
                    label=str(int(scores[i % 256].argmax())),
                    confidence=float(scores[i % 256].max()),
                    request_id=f"bench-{i // 8}",
                    tags={"bench": "1"} if i % 4 == 0 else {},
                    input_type=None if images is None else "image/png",
                    # Every input distinct (a trailer of its own): the object store keeps one object per content.
                    input_bytes=None if images is None else images[i % len(images)] + i.to_bytes(8, "little"),
                )
                entries.append(encode(record))
            pipe.xadd(keys.stream, pack(entries) if len(entries) > 1 else entries[0])  # type: ignore[arg-type]
        pipe.execute()


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=IngestConfig.batch_size)
    parser.add_argument("--pack", type=int, default=PACK_RECORDS, help="Records an entry, as the service packs.")
    parser.add_argument("--image-kb", type=int, default=None, help="PNG inputs of about this size (else digits).")
    parser.add_argument("--blob-url", default=None, help="Inputs of --blob-min-bytes or more go to this object store.")
    parser.add_argument("--blob-min-bytes", type=int, default=1024)
    parser.add_argument(
        "--health",
        action="store_true",
        help="Then fold the stored digits into the health windows, timed (needs the "
        "trained digits-cnn and its split under var/).",
    )
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    keys = Keys(harness.new_prefix())
    client = redis.Redis.from_url(args.redis)
    database, url = harness.create_database(args.postgres)
    try:
        with psycopg.connect(url) as conn:
            migrate(conn)
        if args.blob_url is not None:
            blobs.attach(url, BlobStore(args.blob_url, min_bytes=args.blob_min_bytes))
        started = time.perf_counter()
        images = None if args.image_kb is None else pngs(args.image_kb)
        pack_size = args.pack if images is None else max(1, min(args.pack, PACK_BYTES // len(images[0])))
        version = store.get("digits-cnn:latest").version if args.health else "bench"
        fill(client, keys, args.records, pack_size=pack_size, images=images, version=version)
        logger.info("filled %d records in %.1f s", args.records, time.perf_counter() - started)
        redis_bytes = (client.memory_usage(keys.stream, samples=0) or 0) / args.records
        input_bytes = 8 * 8 * 4 + 128 if images is None else sum(map(len, images)) / len(images)
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
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE predictions")
            size = conn.execute(
                "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
                " WHERE inhparent = 'predictions'::regclass"
            ).fetchone()
        bytes_per_row = float(size[0] if size and size[0] else 0) / args.records
        logger.info("lag after: %s", lag(client, keys))
        kind = "digits (.npy)" if images is None else f"PNG images of {input_bytes / 1024:.1f} KB"
        kind += "" if args.blob_url is None else f", inputs of {args.blob_min_bytes} bytes or more in {args.blob_url}"
        print(
            f"{kind}: ingested {args.records} predictions in {elapsed:.2f} s: {args.records / elapsed:,.0f}/s "
            f"(one worker, batch {args.batch_size}, {pack_size} records an entry); "
            f"{bytes_per_row:,.0f} bytes per stored prediction in Postgres (input {input_bytes:,.0f}); "
            f"{redis_bytes:,.0f} bytes per record in the Redis stream"
        )
        if args.health:
            report_health(url, args.records, elapsed)
    finally:
        harness.delete_keys(args.redis, keys.prefix)
        harness.drop_database(args.postgres, database)


def report_health(url: str, records: int, ingest_s: float) -> None:
    """Time the health job folding the stored digits (their version's reference made first)."""
    from feedback import health
    from feedback.datasets import LabelSchema
    from feedback.datasets.originals import originals_for
    from feedback.datasets.validation import freeze_validation

    stored = store.get("digits-cnn:latest")
    with tempfile.TemporaryDirectory() as folder, psycopg.connect(url, autocommit=True) as conn:
        originals = originals_for(conn, stored.name, Path("var/validation/digits-cnn-split.json"))
        if originals is None:
            raise SystemExit("the digits model's data is not found: train it first (`loop train`)")
        schema = LabelSchema.of(stored.card.model_spec)
        freeze_validation(conn=conn, model_name=stored.name, originals=originals, schema=schema, root_url=folder)
        health.reference(conn, stored)
        started = time.perf_counter()
        health.advance_all(conn, config=health.HealthConfig(delay_s=0, lookback_s=3600))
        took = time.perf_counter() - started
    print(
        f"health job: folded {records} predictions in {took:.2f} s: {records / took:,.0f}/s, "
        f"{took / ingest_s:.1%} of the ingest worker's time for them"
    )


if __name__ == "__main__":
    main()
