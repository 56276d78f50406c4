"""Serving throughput with prediction logging on and off: same machine, same load, same run.

    python -m benchmarks.bench_logging --concurrency 32 --seconds 10 --rounds 2

Starts `loop serve` twice on the configured servers (by default the machine's Postgres and
Redis, in a fresh database and key prefix): once storing every prediction (with its ingest
worker running), once not. wrk drives each in turn with single-digit requests; rounds alternate
on and off so drift hits both. Prints a Markdown table and the on/off ratio.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import harness
from loadtest import wrk
from models import digits

logger = logging.getLogger("bench_logging")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--log-dir", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.log_dir.mkdir(parents=True, exist_ok=True)

    database, database_url = harness.create_database(args.postgres)
    prefix = harness.new_prefix()
    base = {
        "LOOP_DATABASE_URL": database_url,
        "LOOP_REDIS_URL": args.redis,
        "LOOP_REDIS_PREFIX": prefix,
        "LOOP_VAR_DIR": str(args.log_dir / "var"),
    }
    body = {"samples": [digits.load().images[0].tolist()]}
    results: dict[str, list[wrk.WrkResult]] = {"on": [], "off": []}
    try:
        for round_ in range(args.rounds):
            for mode in ("on", "off"):
                port = 3900 + (mode == "off")
                env = {**base, "LOOP_LOG_PREDICTIONS": "true" if mode == "on" else "false"}
                process = harness.start(
                    harness.LOOP_SERVE,
                    {**env, "LOOP_PORT": str(port), "LOOP_INGEST_METRICS_PORT": "0"},
                    ready_url=f"http://127.0.0.1:{port}/readyz",
                    log=args.log_dir / f"serve-{mode}.log",
                )
                try:
                    url = f"http://127.0.0.1:{port}/predict"
                    wrk.run(url, body, connections=args.concurrency, seconds=args.warmup)
                    result = wrk.run(url, body, connections=args.concurrency, seconds=args.seconds)
                finally:
                    harness.stop(process)
                logger.info("round %d, logging %s: %s", round_ + 1, mode, result)
                results[mode].append(result)
    finally:
        harness.drop_database(args.postgres, database)
        harness.delete_keys(args.redis, prefix)

    def mean(mode: str, attr: str) -> float:
        return sum(float(getattr(r, attr)) for r in results[mode]) / len(results[mode])

    print(f"\nconcurrency {args.concurrency}, {args.seconds:g} s per run, {args.rounds} rounds, 1 sample a request\n")
    print("| logging | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for mode in ("on", "off"):
        errors = sum(r.errors for r in results[mode])
        row = f"{mean(mode, 'requests_per_s'):,.0f} | {mean(mode, 'p50_ms'):.1f} | {mean(mode, 'p99_ms'):.1f}"
        print(f"| {mode} | {row} | {errors} |")
    print(f"\nlogging on / off throughput: {mean('on', 'requests_per_s') / mean('off', 'requests_per_s'):.2f}")


if __name__ == "__main__":
    main()
