"""How far one more replica takes you: one `loop serve` (a worker, its ingest worker) against two on
separate ports, both on one Postgres and one Redis, each driven by its own wrk at the same
concurrency, one digit a request.

    python -m benchmarks.bench_replicas --connections 32 --seconds 8 --rounds 2

Prints requests a second for one replica and for two (their sum), with p50 / p99, and the ratio.
On a machine with fewer cores than the replicas, server and load generator need, the ratio says
what the cores allow, not what the replicas would do apart (docs/capacity.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
from harness.serve import add_loop_options, loop_serve
from loadtest import wrk
from models import digits

logger = logging.getLogger("bench_replicas")


def drive(urls: list[str], connections: int, seconds: float) -> list[wrk.WrkResult]:
    """Every replica at once, a wrk each."""
    body = {"samples": [digits.load().images[0].tolist()]}
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda u: wrk.run(f"{u}/predict", body, connections=connections, seconds=seconds), urls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_options(parser)
    parser.add_argument("--connections", type=int, default=32, help="Connections to each replica.")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wrk.ensure_wrk()
    rates: dict[int, list[float]] = {1: [], 2: []}
    with (
        tempfile.TemporaryDirectory() as scratch,
        harness.throwaway(args.postgres, args.redis) as (database_url, prefix),
        contextlib.ExitStack() as stack,
    ):
        urls = [
            stack.enter_context(
                loop_serve(
                    args.model,
                    database_url=database_url,
                    redis_url=args.redis,
                    prefix=prefix,
                    var_dir=Path(scratch) / f"var{n}",
                    log=Path(scratch) / f"serve{n}.log",
                )
            )
            for n in range(2)
        ]
        drive(urls, args.connections, 2)  # warm both
        for _ in range(args.rounds):
            for count in (1, 2):
                results = drive(urls[:count], args.connections, args.seconds)
                rate = sum(r.requests_per_s for r in results)
                rates[count].append(rate)
                errors = sum(r.errors for r in results)
                p50 = max(r.p50_ms for r in results)
                p99 = max(r.p99_ms for r in results)
                print(f"{count} replica(s): {rate:,.0f} req/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms, {errors} errors")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"median over {args.rounds} rounds: one {one:,.0f} req/s, two {two:,.0f} req/s: {two / one:.2f}x")


if __name__ == "__main__":
    main()
