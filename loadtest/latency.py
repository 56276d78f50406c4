"""Sequential latency of `POST /predict` (concurrency 1, one keep-alive connection).

    python -m loadtest.latency http://127.0.0.1:3000/predict -n 500

Reports client-side p50 and p99 in milliseconds; the load generator of the benchmark harness is
the tool for throughput. The sample is random numbers of the served model's shape (`GET /models`).
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from loadtest.samples import base_url, samples, served_model


def measure(url: str, requests: int, warmup: int = 20) -> list[float]:
    body = json.dumps({"samples": samples(served_model(base_url(url)), 1)})
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    with httpx.Client(timeout=30) as client:
        for i in range(warmup + requests):
            started = time.perf_counter()
            response = client.post(url, content=body, headers=headers)
            elapsed_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if i >= warmup:
                latencies.append(elapsed_ms)
    return sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("-n", "--requests", type=int, default=500)
    args = parser.parse_args()
    lat = measure(args.url, args.requests)
    n = len(lat)
    print(f"{args.url}: {n} requests, p50 {lat[n // 2]:.2f} ms, p99 {lat[min(n - 1, int(n * 0.99))]:.2f} ms")


if __name__ == "__main__":
    main()
