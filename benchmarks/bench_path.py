"""What each piece of the prediction path costs: the service started once per configuration, the
same load on each, in one run on one machine.

    python -m benchmarks.bench_path --concurrency 1,64 --seconds 10

Configurations, each `loop serve` with prediction logging on (its ingest worker running) unless
said: BentoML's access log and OpenTelemetry tracing on for predictions (BentoML's defaults; either
sends predictions through BentoML's API), each of the two alone, neither but through BentoML's API
(`LOOP_FAST_PATH=false`), uvicorn's h11 parser, our defaults (service.fast_path, httptools),
our defaults with BentoML's own HTTP metrics off,
our defaults with prediction logging off (what the Redis append costs), and two workers, each
with its own sessions or batching across both in one inference process (`LOOP_INFERENCE=shared`). One digit per request,
wrk, closed loop; prints a table of req/s and p50 / p99 and each configuration's ratio to our
defaults, and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import harness
from loadtest import wrk
from models import digits

logger = logging.getLogger("bench_path")

CONFIGS: dict[str, dict[str, str]] = {
    "access log + tracing on (BentoML's defaults)": {
        "LOOP_ACCESS_LOG_PREDICTIONS": "true",
        "LOOP_TRACE_PREDICTIONS": "true",
    },
    "access log on": {"LOOP_ACCESS_LOG_PREDICTIONS": "true"},
    "tracing on": {"LOOP_TRACE_PREDICTIONS": "true"},
    "both off, through BentoML's API (LOOP_FAST_PATH=false)": {"LOOP_FAST_PATH": "false"},
    "ours, h11 parser (pure Python)": {"LOOP_HTTP_PARSER": "h11"},
    "ours (fast path; both off, httptools parser)": {},
    "ours, BentoML's HTTP metrics off": {"BENTOML_CONFIG_OPTIONS": "services.loop.metrics.enabled=false"},
    "ours, prediction logging off": {"LOOP_LOG_PREDICTIONS": "false"},
    "ours, two workers": {"LOOP_WORKERS": "2"},
    "ours, two workers, shared inference": {"LOOP_WORKERS": "2", "LOOP_INFERENCE": "shared"},
}
BASELINE = "ours (fast path; both off, httptools parser)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=3)
    harness.add_loop_options(parser)
    parser.add_argument("--only", default="", help="configurations to run, separated by ; (default: all)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/path.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    body = {"samples": digits.load().images[:1].tolist()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], wrk.WrkResult] = {}
    configs = {k: v for k, v in CONFIGS.items() if not args.only or k in args.only.split(";") or k == BASELINE}
    with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
        for label, overrides in configs.items():
            serving = harness.loop_serve(
                args.model,
                database_url=database_url,
                redis_url=args.redis,
                prefix=prefix,
                var_dir=args.out.parent / "path-var",
                log=args.out.parent / "path-serve.log",
                overrides=overrides,
            )
            with serving as root:
                url = f"{root}/predict"
                for c in concurrencies:
                    wrk.run(url, body, connections=c, seconds=args.warmup)
                    results[label, c] = result = wrk.run(url, body, connections=c, seconds=args.seconds)
                    logger.info("%s c=%d: %s", label, c, result)
    header = " | ".join(f"c={c} req/s (p50 / p99 ms), to ours" for c in concurrencies)
    lines = [f"| configuration | {header} |", "|---" * (len(concurrencies) + 1) + "|"]
    for label in configs:
        cells = []
        for c in concurrencies:
            r, base = results[label, c], results[BASELINE, c]
            ratio = r.requests_per_s / base.requests_per_s
            cells.append(f"{r.requests_per_s:,.0f} ({r.p50_ms:.2f} / {r.p99_ms:.1f}), {ratio:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    report = "\n".join(lines)
    args.out.write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
