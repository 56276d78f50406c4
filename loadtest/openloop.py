"""Open-loop load: requests sent on a fixed schedule, whether or not earlier ones were answered.

A closed loop (wrk, locust) waits for an answer before sending the next request, so a slow server
slows its own load down and its worst latencies hide (coordinated omission). Here request i is due
at start + i / rate; its latency is measured from that due time, so time spent waiting for a free
connection or behind a stalled server counts.

    python -m loadtest.openloop http://127.0.0.1:3000/predict --rate 500 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from dataclasses import dataclass

import aiohttp
import numpy as np

from loadtest.samples import base_url, samples, served_model

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class OpenLoopResult:
    rate: float  # requests per second asked for
    sent: int
    answered_per_s: float  # 2xx answers per second of the schedule
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx, connection errors and timeouts
    max_send_lag_ms: float  # how late the generator itself sent its latest request
    client_cpu: float  # the generator's CPU seconds per wall second


async def _run(
    url: str, body: bytes, *, content_type: str, rate: float, seconds: float, max_connections: int
) -> OpenLoopResult:
    latencies: list[float] = []
    errors = 0
    lag = 0.0
    connector = aiohttp.TCPConnector(limit=max_connections)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    headers = {"Content-Type": content_type}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

        async def one(due: float) -> None:
            nonlocal errors
            try:
                async with session.post(url, data=body) as response:
                    await response.read()
                    ok = 200 <= response.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - due)
            else:
                errors += 1

        tasks = []
        total = int(rate * seconds)
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    ordered = np.sort(np.asarray(latencies)) * 1000 if latencies else np.asarray([float("nan")])
    return OpenLoopResult(
        rate=rate,
        sent=total,
        answered_per_s=len(latencies) / seconds,
        p50_ms=float(np.percentile(ordered, 50)),
        p99_ms=float(np.percentile(ordered, 99)),
        errors=errors,
        max_send_lag_ms=lag * 1000,
        client_cpu=0.0,
    )


def run(url: str, payload: object, *, rate: float, seconds: float, max_connections: int = 256) -> OpenLoopResult:
    """Send `rate` requests per second for `seconds`, on one event loop: `payload` as JSON, or as
    application/octet-stream when it is bytes."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    content_type = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    result = asyncio.run(
        _run(url, body, content_type=content_type, rate=rate, seconds=seconds, max_connections=max_connections)
    )
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / (time.perf_counter() - started)
    return OpenLoopResult(**{**result.__dict__, "client_cpu": cpu})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    body = {"samples": samples(served_model(base_url(args.url)), 1)}  # the served model's shape (GET /models)
    result = run(args.url, body, rate=args.rate, seconds=args.seconds)
    print(json.dumps(result.__dict__, indent=2))


if __name__ == "__main__":
    main()
