"""Where a service worker's time goes under load: py-spy samples it while wrk drives it.

    python -m benchmarks.profile_service --concurrency 32 --seconds 10

Starts `loop serve` (prediction logging on, with its ingest worker) on a throwaway database and
key prefix, drives `/predict` with wrk, and samples the BentoML worker with py-spy (`pip install
py-spy`; it needs ptrace, which root has). Prints the functions with the most samples on the
stack (inclusive) and at the top of it (self), as shares of all samples, and writes the collapsed
stacks (flame-graph input) and a speedscope file to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import logging
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

import harness
from loadtest import wrk
from models import digits

logger = logging.getLogger("profile_service")


def worker_pid(root: int) -> int:
    """The BentoML worker: the descendant running `service.app:Predictor` that serves requests."""
    family = psutil.Process(root).children(recursive=True)
    candidates = [p for p in family if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    if not candidates:
        raise SystemExit(f"no BentoML worker among {[' '.join(p.cmdline())[:80] for p in family]}")
    return candidates[0].pid


def summarise(collapsed: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "on the stack (inclusive):"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "at the top (self):"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--model", default="digits-cnn:latest")
    parser.add_argument("--log-predictions", default="true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out = args.out or Path("var/profile") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    name, _, version = args.model.partition(":")
    port = 3980
    url = f"http://127.0.0.1:{port}/predict"
    body = {"samples": [digits.load().images[0].tolist()]}
    collapsed = out / "stacks.txt"
    result: list[wrk.WrkResult] = []
    with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
        env = {
            "LOOP_MODEL_NAME": name,
            "LOOP_MODEL_TAG": version or "latest",
            "LOOP_DATABASE_URL": database_url,
            "LOOP_REDIS_URL": args.redis,
            "LOOP_REDIS_PREFIX": prefix,
            "LOOP_VAR_DIR": str(out / "var"),
            "LOOP_INGEST_METRICS_PORT": "0",
            "LOOP_LOG_PREDICTIONS": args.log_predictions,
            "LOOP_PORT": str(port),
        }
        command = harness.LOOP_SERVE
        ready = f"http://127.0.0.1:{port}/readyz"
        with harness.running(command, env, ready_url=ready, log=out / "serve.log") as process:
            wrk.run(url, body, connections=args.concurrency, seconds=3)  # warm-up
            pid = worker_pid(process.pid)
            load = threading.Thread(
                target=lambda: result.append(wrk.run(url, body, connections=args.concurrency, seconds=args.seconds + 2))
            )
            load.start()
            time.sleep(1)
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(collapsed),
                    "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )
            load.join()
    report = f"load: {result[0]}\n\n" + summarise(collapsed, args.top)
    (out / "summary.txt").write_text(report + "\n")
    print(report)
    print(f"\nstacks and summary in {out}")


if __name__ == "__main__":
    main()
