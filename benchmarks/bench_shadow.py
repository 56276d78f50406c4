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
import psutil

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


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by role: Postgres, Redis, the ingest worker, the service (every other
    `loop` process), all processes of each summed."""
    used: dict[str, float] = {}
    for process in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        name, cmdline, times = (
            process.info["name"] or "",
            " ".join(process.info["cmdline"] or ()),
            process.info["cpu_times"],
        )
        if times is None:
            continue
        if name.startswith("postgres") or "postgres:" in cmdline:
            role = "postgres"
        elif name.startswith("redis-server"):
            role = "redis"
        elif "ingest" in cmdline:
            role = "ingest"
        elif "loop" in cmdline or "bentoml" in cmdline or "uvicorn" in cmdline:
            role = "service"
        else:
            continue
        used[role] = used.get(role, 0.0) + times.user + times.system
    return used


def measured(
    url: str, body: dict[str, list[list[list[float]]]], connections: int, seconds: float
) -> tuple[wrk.WrkResult, dict[str, float]]:
    """One wrk run, and the CPU seconds each role used per 1,000 requests during it."""
    before = cpu_seconds()
    result = wrk.run(url, body, connections=connections, seconds=seconds)
    after = cpu_seconds()
    per_k = 1000 / max(result.requests, 1)
    return result, {role: (after[role] - before.get(role, 0.0)) * per_k for role in after}


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
    cpu: list[tuple[dict[str, float], dict[str, float]]] = []
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
                without, cpu_without = measured(url, body, args.concurrency, args.seconds)
                start_shadow(
                    conn=conn,
                    model_name=stored.name,
                    model_version=stored.version,
                    share=1.0,
                    actor=None,
                    announcer=announce,
                )
                time.sleep(2)  # the workers load it
                shadowed, cpu_with = measured(url, body, args.concurrency, args.seconds)
                stop_shadow(
                    conn=conn, model_name=stored.name, reason="the round is over", actor=None, announcer=announce
                )
                time.sleep(2)  # and let its queue drain
                logger.info("without %s; with %s", without, shadowed)
                rounds.append((without, shadowed))
                cpu.append((cpu_without, cpu_with))
            outcomes = shadow_outcomes(root)
    report = _report(rounds, args.concurrency, outcomes) + "\n\n" + _cpu_report(cpu)
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


def _cpu_report(cpu: list[tuple[dict[str, float], dict[str, float]]]) -> str:
    """CPU seconds per 1,000 requests by role, the median over the rounds, without and with the shadow."""
    roles = sorted({role for pair in cpu for side in pair for role in side})
    lines = ["| CPU s per 1,000 requests (median) | no shadow | a shadow at share 1.0 |", "|---|---|---|"]
    for role in roles:
        without, shadowed = (statistics.median(pair[i].get(role, 0.0) for pair in cpu) for i in (0, 1))
        lines.append(f"| {role} | {without:.3f} | {shadowed:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
