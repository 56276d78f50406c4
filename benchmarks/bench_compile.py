"""Compile a training version from a million labelled samples: time and peak memory.

    python -m benchmarks.bench_compile --samples 1000000

Fills a throwaway database with synthetic predictions (binary COPY, as the ingest worker writes
them), labels them all in SQL (90% 'correct', 9% 'wrong' with another label, 1% discarded), then
compiles the training version in a child process, which reports its wall time and peak RSS
(getrusage), and compiles once more at the same watermark to show the id does not change.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

import harness
from benchmarks.bench_review import fill
from feedback import review as rs
from feedback.datasets import LabelSchema, bundled_originals, compile_training, freeze_validation
from feedback.migrate import migrate
from models import digits

logger = logging.getLogger("bench_compile")

MODEL = "digits-cnn"

_ANNOTATE = """
INSERT INTO annotations (prediction_id, item_created_at, actor_id, verdict, label, reason)
SELECT id, created_at, %(actor)s,
       CASE WHEN n %% 100 = 0 THEN 'discard' WHEN n %% 100 < 10 THEN 'wrong' ELSE 'correct' END,
       CASE WHEN n %% 100 BETWEEN 1 AND 9 THEN ((label_index + 1) %% 10)::text END,
       CASE WHEN n %% 100 = 0 THEN 'unreadable' END
FROM (SELECT id, created_at, label_index, row_number() OVER (ORDER BY created_at, id) AS n FROM predictions) p
"""

_PROJECT = """
INSERT INTO review_state (prediction_id, item_created_at, required_reviews, status, label, revision, reviewers)
SELECT a.prediction_id, a.item_created_at, 1,
       CASE a.verdict WHEN 'discard' THEN 'discarded' ELSE 'reviewed' END,
       CASE a.verdict WHEN 'correct' THEN p.label WHEN 'wrong' THEN a.label END,
       a.id, 1
FROM annotations a JOIN predictions p ON p.created_at = a.item_created_at AND p.id = a.prediction_id
"""


def label_everything(conn: psycopg.Connection) -> None:
    admin, _ = rs.create_user(conn=conn, name="bench-admin", role=rs.Role.ADMIN)
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(_ANNOTATE, {"actor": admin.id})
        conn.execute(_PROJECT)
    conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")
    logger.info("labelled every prediction in %.1f s", time.perf_counter() - started)


def compile_once(database_url: str, root: str, split_path: Path, watermark: int | None) -> dict[str, Any]:
    schema = LabelSchema(class_names=digits.CLASS_NAMES, input_shape=digits.INPUT_SHAPE)
    originals = bundled_originals(MODEL, split_path)
    assert originals is not None
    with psycopg.connect(database_url, autocommit=True) as conn:
        validation = freeze_validation(conn=conn, model_name=MODEL, originals=originals, schema=schema, root_url=root)
        started = time.perf_counter()
        version = compile_training(
            conn=conn,
            model_name=MODEL,
            schema=schema,
            originals=originals,
            validation=validation,
            root_url=root,
            watermark=watermark,
        )
        seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in Path(version.uri).rglob("*") if p.is_file())
    return {
        "id": version.id,
        "rows": version.rows,
        "watermark": version.watermark,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "bytes": size,
        "skipped": version.manifest.get("skipped", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--keep", action="store_true", help="Keep the database (its name is printed).")
    parser.add_argument("--child", nargs=4, metavar=("URL", "ROOT", "SPLIT", "WATERMARK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.child:  # the measured compile, alone in its process
        url, root, split, watermark = args.child
        result = compile_once(url, root, Path(split), None if watermark == "-" else int(watermark))
        print(json.dumps(result))  # read by the parent
        return

    name, url = harness.create_database(args.postgres)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
            fill(conn, args.samples)
            label_everything(conn)
        with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
            results: list[dict[str, Any]] = []
            for watermark in ("-", "same"):
                given = "-" if watermark == "-" else str(results[0]["watermark"])
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.bench_compile",
                        "--child",
                        url,
                        f"{tmp}/datasets-{len(results)}",
                        f"{tmp}/split.json",
                        given,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                logger.info("compile %d: %s", len(results), results[-1])
        first, second = results
        logger.info(
            "%d samples: %d rows in %.1f s (%.0f rows/s), peak RSS %.0f MiB, %.1f MiB on disk; "
            "again at watermark %s: %.1f s, same id: %s",
            args.samples,
            first["rows"],
            first["seconds"],
            first["rows"] / first["seconds"],
            first["peak_rss_mib"],
            first["bytes"] / 2**20,
            first["watermark"],
            second["seconds"],
            first["id"] == second["id"],
        )
    finally:
        if args.keep:
            logger.info("kept database %s", name)
        else:
            harness.drop_database(args.postgres, name)


if __name__ == "__main__":
    main()
