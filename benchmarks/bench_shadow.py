"""What a shadow costs the answers: one service, measured without a shadow and with one seeing
every request (share 1.0), alternately for `--rounds` rounds, the same load each time.

    python -m benchmarks.bench_shadow --concurrency 64 --seconds 10 --rounds 3

`loop serve` of the model (its ingest worker included), wrk closed loop with one digit per
request; the shadow is the model's own stored version (the same work as a candidate of its
shape), started and stopped over the same announcements an admin's would make. Alternating within
one service keeps the machine's drift out of the ratio. Prints each round's req/s and p50 / p99,
the ratio with a shadow to without (each round's, and their median), and the shadow's outcomes
from /metrics (mirrored, dropped, stored), and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import time
from pathlib import Path

import httpx

import harness
from feedback.keys import Keys
from feedback.use_cases import shadow_announcer, start_shadow, stop_shadow
from loadtest import wrk
from models import digits, store
from service import database

logger = logging.getLogger("bench_shadow")


def shadow_outcomes(root: str) -> dict[str, float]:
    """The workers' shadow counters, summed by outcome."""
    found: dict[str, float] = {}
    for line in httpx.get(f"{root}/metrics", timeout=10).text.splitlines():
        matched = re.match(r'loop_shadow_batches_total\{.*outcome="(\w+)".*\} ([0-9.e+]+)', line)
        if matched:
            found[matched[1]] = found.get(matched[1], 0.0) + float(matched[2])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    harness.add_loop_options(parser)
    parser.add_argument("--out", type=Path, default=Path("var/bench/shadow.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    body = {"samples": digits.load().images[:1].tolist()}
    stored = store.get(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rounds: list[tuple[wrk.WrkResult, wrk.WrkResult]] = []
    with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
        announce = shadow_announcer(args.redis, Keys(prefix))
        serving = harness.loop_serve(
            stored.tag,
            database_url=database_url,
            redis_url=args.redis,
            prefix=prefix,
            var_dir=args.out.parent / "shadow-var",
            log=args.out.parent / "shadow-serve.log",
        )
        with serving as root, database.connect(database_url) as conn:
            url = f"{root}/predict"
            wrk.run(url, body, connections=args.concurrency, seconds=args.warmup)
            for _ in range(args.rounds):
                without = wrk.run(url, body, connections=args.concurrency, seconds=args.seconds)
                start_shadow(
                    conn=conn,
                    model_name=stored.name,
                    model_version=stored.version,
                    share=1.0,
                    actor=None,
                    announcer=announce,
                )
                time.sleep(2)  # the workers load it
                shadowed = wrk.run(url, body, connections=args.concurrency, seconds=args.seconds)
                stop_shadow(
                    conn=conn, model_name=stored.name, reason="the round is over", actor=None, announcer=announce
                )
                time.sleep(2)  # and let its queue drain
                logger.info("without %s; with %s", without, shadowed)
                rounds.append((without, shadowed))
            outcomes = shadow_outcomes(root)
    report = _report(rounds, args.concurrency, outcomes)
    args.out.write_text(report + "\n")
    print(report)


def _report(rounds: list[tuple[wrk.WrkResult, wrk.WrkResult]], concurrency: int, outcomes: dict[str, float]) -> str:
    lines = [
        f"| round (c={concurrency}) | no shadow: req/s (p50 / p99 ms) | a shadow at share 1.0 | ratio |",
        "|---|---|---|---|",
    ]
    ratios = []
    for i, (without, shadowed) in enumerate(rounds, 1):
        ratios.append(shadowed.requests_per_s / without.requests_per_s)
        cells = [f"{r.requests_per_s:,.0f} ({r.p50_ms:.2f} / {r.p99_ms:.1f})" for r in (without, shadowed)]
        lines.append(f"| {i} | {cells[0]} | {cells[1]} | {ratios[-1]:.2f} |")
    lines.append(f"| median | | | {statistics.median(ratios):.2f} |")
    mirrored, dropped, stored_n = (outcomes.get(k, 0.0) for k in ("mirrored", "dropped", "stored"))
    lines += [
        "",
        f"The shadow's batches: {mirrored:,.0f} mirrored, {dropped:,.0f} dropped (queue full or over its "
        f"latency budget); {stored_n:,.0f} shadow predictions stored.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
