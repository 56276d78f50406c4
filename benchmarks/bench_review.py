"""Moderation latency with a large store: claim + verdict, and a filtered page of the item list.

    python -m benchmarks.bench_review --predictions 1000000 --rounds 300 [--suspects 1000]

Fills a fresh database with synthetic predictions (binary COPY, as the ingest worker writes
them), then times, through the same functions the HTTP routes call: claiming 10 items and giving
10 verdicts (one transaction each), and listing a filtered page of 50; with `--suspects`, claiming
10 in the `suspect` order. Prints p50/p99 in ms.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg

import harness
from feedback import review as rs
from feedback.ids import compose_uuid7
from feedback.migrate import migrate
from feedback.predictions import store
from feedback.predictions.records import Row
from feedback.review.moderation import Status, Verdict
from models.npy import npy_bytes

logger = logging.getLogger("bench_review")


def fill(conn: psycopg.Connection, n: int, chunk: int = 20_000) -> None:
    rng = np.random.default_rng(0)
    inputs = [npy_bytes(rng.integers(0, 17, size=(8, 8)).astype(np.float32)) for _ in range(64)]
    scores = np.full(10, 0.1, dtype="<f4").tobytes()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    step_ms = 30 * 24 * 3600 * 1000 // n  # a month of traffic
    for begin in range(0, n, chunk):
        rows = []
        for i in range(begin, min(begin + chunk, n)):
            ms = int(start.timestamp() * 1000) + i * step_ms
            pid = compose_uuid7(ms, 0, int(rng.integers(0, 2**62)))
            rows.append(
                Row(
                    id=pid,
                    created_at=start + timedelta(milliseconds=i * step_ms),
                    model_name="digits-cnn",
                    model_version=f"v{i * 4 // n + 1}",
                    label=str(i % 10),
                    label_index=i % 10,
                    confidence=float(rng.uniform(0.2, 1.0)),
                    scores=scores,
                    input_npy=inputs[i % 64],
                    request_id=f"bench-{i}",
                    tags={},
                )
            )
        store.insert_rows(conn=conn, rows=rows)
        logger.info("stored %d / %d", min(begin + chunk, n), n)
    # Steady state, not the bulk load's aftermath: vacuum (visibility map, statistics) and flush
    # the load's WAL now rather than under autovacuum and a checkpoint during the timing.
    conn.execute("VACUUM ANALYZE predictions")
    conn.execute("CHECKPOINT")


def suspect_claims(conn: psycopg.Connection, suspects: int, rounds: int) -> list[float]:
    """Times of claiming 10 items in the `suspect` order, with `suspects` items of the log ranked as
    likely label errors (spread over the month, as a ranking of a compiled version is)."""
    conn.execute(
        "INSERT INTO label_suspects (model_name, item_id, prediction_id, item_created_at, rank, quality, label,"
        " suggested, dataset_id, watermark) SELECT 'digits-cnn', id::text, id, created_at,"
        " row_number() OVER (ORDER BY random()), 0.1, label, label, 'bench', 0"
        " FROM (SELECT id, created_at, label FROM predictions ORDER BY random() LIMIT %s) picked",
        (suspects,),
    )
    conn.execute("ANALYZE label_suspects")
    times = []
    for i in range(rounds):
        reviewer, _ = rs.create_user(conn=conn, name=f"suspect-{i}", role=rs.Role.REVIEWER)
        t0 = time.perf_counter()
        rs.claim(conn=conn, user=reviewer, count=10, strategy=rs.Strategy.SUSPECT, lease_seconds=1)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.1f} ms, p99 {p99:.1f} ms (n={len(ordered)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--suspects", type=int, default=0, help="Also time the `suspect` order with this many.")
    parser.add_argument("--keep", action="store_true", help="Keep the database (its name is printed).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    database, database_url = harness.create_database(args.postgres)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            migrate(conn)
            started = time.perf_counter()
            fill(conn, args.predictions)
            logger.info("filled in %.0f s", time.perf_counter() - started)
            user, _ = rs.create_user(conn=conn, name="bench", role=rs.Role.REVIEWER)
            warm, _ = rs.create_user(conn=conn, name="warm-up", role=rs.Role.REVIEWER)
            results: dict[str, list[float]] = {}
            for _ in range(20):  # warm-up, not counted
                rs.claim(conn=conn, user=warm, count=10, strategy=rs.Strategy.OLDEST, lease_seconds=1)
            for i in range(args.rounds):
                strategy = rs.Strategy.OLDEST if i % 2 == 0 else rs.Strategy.LEAST_CONFIDENT
                t0 = time.perf_counter()
                claimed = rs.claim(conn=conn, user=user, count=10, strategy=strategy, lease_seconds=300)
                t1 = time.perf_counter()
                verdicts = [  # a wrong verdict names a label other than the model's own
                    rs.VerdictIn(c.prediction_id, Verdict.CORRECT, None)
                    if j % 3
                    else rs.VerdictIn(c.prediction_id, Verdict.WRONG, "1" if c.label == "0" else "0")
                    for j, c in enumerate(claimed)
                ]
                rs.record_verdicts(conn=conn, user=user, verdicts=verdicts)
                t2 = time.perf_counter()
                for name, ms in (
                    (f"claim 10 ({strategy.value})", (t1 - t0) * 1000),
                    ("verdicts on 10", (t2 - t1) * 1000),
                    (f"claim 10 + verdicts on 10 ({strategy.value})", (t2 - t0) * 1000),
                ):
                    results.setdefault(name, []).append(ms)
            if args.suspects:
                results["claim 10 (suspect)"] = suspect_claims(conn, args.suspects, args.rounds)
            filters = [
                rs.ItemFilter(model_name="digits-cnn", model_version="v2", min_confidence=0.5, max_confidence=0.9),
                rs.ItemFilter(status=Status.REVIEWED, sort=rs.SortKey.CONFIDENCE),
                rs.ItemFilter(label="3", status=Status.UNREVIEWED, descending=True),
                rs.ItemFilter(
                    created_from=datetime(2026, 1, 10, tzinfo=UTC), created_to=datetime(2026, 1, 12, tzinfo=UTC)
                ),
                rs.ItemFilter(reviewer="bench"),
            ]
            results["filtered list page (50)"] = []
            for i in range(args.rounds):
                f = filters[i % len(filters)]
                cursor = None
                for _ in range(2):  # a first page, then the next one
                    t0 = time.perf_counter()
                    page = rs.list_items(conn=conn, filters=f, limit=50, cursor=cursor)
                    results["filtered list page (50)"].append((time.perf_counter() - t0) * 1000)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
        print(f"\n{args.predictions:,} predictions stored; {args.rounds} rounds each\n")
        for name, samples in results.items():
            print(f"{name}: {percentiles(samples)}")
    finally:
        if args.keep:
            print(f"kept database {database}")
        else:
            harness.drop_database(args.postgres, database)


if __name__ == "__main__":
    main()
