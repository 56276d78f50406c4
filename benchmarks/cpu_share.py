"""Which process uses the machine's cores while wrk drives `/predict`: what limits one more worker.

    python -m benchmarks.cpu_share --workers 1,2 --concurrency 64 --seconds 10

Starts `loop serve` (prediction logging on, its ingest worker running) on a throwaway database and
key prefix, once per worker count; after a warm-up, measures the CPU time each kind of process
spent during the run (service workers, ingest worker, Postgres, Redis, wrk) in cores, beside the
throughput, and prints the CPU time of a request in the service's workers.
"""

from __future__ import annotations

import argparse
import collections
import logging
import threading
import time
from pathlib import Path

import psutil

import harness
from loadtest import wrk
from models import digits

logger = logging.getLogger("cpu_share")


# What a process is, by a part of its command line (or name, for the servers).
KINDS = (
    ("_bentoml_impl.worker", "service workers"),
    ("service ingest", "ingest worker"),
    ("redis", "redis"),
    ("postgres", "postgres"),
    ("wrk", "wrk"),
)


def kind(process: psutil.Process) -> str | None:
    try:
        command, name = " ".join(process.cmdline()), process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for marker, what in KINDS:
        if marker in command or name.startswith(marker):
            return what
    return None


def cpu_seconds() -> dict[int, tuple[str, float]]:
    found = {}
    for process in psutil.process_iter():
        what = kind(process)
        if what is not None:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            found[process.pid] = (what, times.user + times.system)
    return found


def _drive(into: list[wrk.WrkResult], url: str, body: dict[str, object], connections: int, seconds: float) -> None:
    into.append(wrk.run(url, body, connections=connections, seconds=seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10)
    harness.add_loop_options(parser)
    parser.add_argument("--out", type=Path, default=Path("var/bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    body = {"samples": digits.load().images[:1].tolist()}
    args.out.mkdir(parents=True, exist_ok=True)
    with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
        for workers in args.workers.split(","):
            serving = harness.loop_serve(
                args.model,
                database_url=database_url,
                redis_url=args.redis,
                prefix=prefix,
                var_dir=args.out / "cpu-var",
                log=args.out / "cpu-serve.log",
                overrides={"LOOP_WORKERS": workers},
            )
            with serving as root:
                url = f"{root}/predict"
                wrk.run(url, body, connections=args.concurrency, seconds=3)
                result: list[wrk.WrkResult] = []
                load = threading.Thread(target=_drive, args=(result, url, body, args.concurrency, args.seconds))
                load.start()
                time.sleep(1)  # wrk is running: its process is counted too
                before, started = cpu_seconds(), time.monotonic()
                time.sleep(args.seconds - 2)
                after, wall = cpu_seconds(), time.monotonic() - started
                load.join()
            cores: dict[str, float] = collections.defaultdict(float)
            for pid, (what, spent) in after.items():
                cores[what] += (spent - before.get(pid, (what, 0.0))[1]) / wall
            rate = result[0].requests_per_s
            print(f"{workers} worker(s), c={args.concurrency}: {rate:,.0f} req/s, p50 {result[0].p50_ms:.1f} ms")
            for what, used in sorted(cores.items(), key=lambda item: -item[1]):
                print(f"  {what:16s} {used:.2f} cores")
            print(
                f"  all of these    {sum(cores.values()):.2f} of {psutil.cpu_count()} cores; "
                f"{1000 * cores.get('service workers', 0.0) / rate:.2f} ms of worker CPU a request"
            )


if __name__ == "__main__":
    main()
