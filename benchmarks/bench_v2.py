"""The Open Inference Protocol and `.npy` against `/predict`, in one run: requests per second and p99.

    python -m benchmarks.bench_v2 --seconds 8 --concurrency 1,32,64 --fast-path both

Starts `loop serve` with the digits model (prediction logging on, ingest running, a throwaway
database and key prefix) and drives it with wrk, one digit per request, four ways: `/predict`
with JSON, `/predict/npy`, `/v2/models/<name>/infer` with JSON data, and the same with the binary
tensor data extension (JSON header, then the 256 bytes of the FP32 tensor; outputs as JSON).
`--fast-path both` runs it all twice, with the fast path on and off (`LOOP_FAST_PATH`). Prints the
table and the ratios to `/predict` at each concurrency. The digits model must be in the store.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import harness
from loadtest import wrk
from models import digits
from models.npy import npy_bytes

logger = logging.getLogger("bench_v2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("var/bench/v2"))
    parser.add_argument("--fast-path", choices=["on", "off", "both"], default="on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    name = digits.DEFAULT_MODEL_NAME
    digit = digits.load().images[0].astype("<f4")
    tensor = {"name": "input", "shape": [1, 8, 8], "datatype": "FP32"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": digit.nbytes}}]}).encode()
    cases: dict[str, Case] = {
        "/predict, JSON": ("/predict", {"samples": [digit.tolist()]}, None, {}),
        "/predict/npy": ("/predict/npy", npy_bytes(digit[np.newaxis]), "application/octet-stream", {}),
        "v2 infer, JSON": (f"/v2/models/{name}/infer", {"inputs": [{**tensor, "data": digit.tolist()}]}, None, {}),
        "v2 infer, binary tensor": (
            f"/v2/models/{name}/infer",
            header + digit.tobytes(),
            "application/octet-stream",
            {"Inference-Header-Content-Length": str(len(header))},
        ),
    }
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.fast_path]
    for fast in modes:
        results = run(cases, levels, args, fast=fast)
        print(f"\nfast path {'on' if fast else 'off'}")
        print("| body | " + " | ".join(f"c={c} req/s (p99 ms)" for c in levels) + " |")
        print("|---|" + "---|" * len(levels))
        for case in cases:
            cells = [f"{results[case, c].requests_per_s:,.0f} ({results[case, c].p99_ms:.1f})" for c in levels]
            print(f"| {case} | " + " | ".join(cells) + " |")
        for c in levels:
            reference = results["/predict, JSON", c].requests_per_s
            ratios = ", ".join(f"{case} {results[case, c].requests_per_s / reference:.2f}" for case in list(cases)[1:])
            print(f"c={c}: ratio to /predict JSON: {ratios}")


Case = tuple[str, Mapping[str, object] | bytes, str | None, dict[str, str]]


def run(
    cases: dict[str, Case], levels: list[int], args: argparse.Namespace, *, fast: bool
) -> dict[tuple[str, int], wrk.WrkResult]:
    """Every case at every concurrency against one `loop serve`, the fast path on or off."""
    base = "http://127.0.0.1:3982"
    results: dict[tuple[str, int], wrk.WrkResult] = {}
    with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
        env = {
            "LOOP_MODEL_NAME": digits.DEFAULT_MODEL_NAME,
            "LOOP_MODEL_TAG": "latest",
            "LOOP_DATABASE_URL": database_url,
            "LOOP_REDIS_URL": args.redis,
            "LOOP_REDIS_PREFIX": prefix,
            "LOOP_VAR_DIR": str(args.out / "var"),
            "LOOP_INGEST_METRICS_PORT": "0",
            "LOOP_PORT": "3982",
            "LOOP_FAST_PATH": "true" if fast else "false",
        }
        with harness.running(harness.LOOP_SERVE, env, ready_url=f"{base}/readyz", log=args.out / "serve.log"):
            for case, (path, body, content_type, headers) in cases.items():
                wrk.run(base + path, body, connections=8, seconds=2, content_type=content_type, headers=headers)
                for c in levels:
                    result = wrk.run(
                        base + path,
                        body,
                        connections=c,
                        seconds=args.seconds,
                        content_type=content_type,
                        headers=headers,
                    )
                    if result.errors:
                        raise SystemExit(f"{case} at c={c}: {result.errors} errors; see {args.out / 'serve.log'}")
                    results[case, c] = result
                    logger.info("%-26s c=%-3d %8.0f req/s  p99 %6.1f ms", case, c, result.requests_per_s, result.p99_ms)
    return results


if __name__ == "__main__":
    main()
