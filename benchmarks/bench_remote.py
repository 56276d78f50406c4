"""What inference on an engine costs: one `loop serve` (a worker, its ingest worker) running the model
in process, against the same with LOOP_INFERENCE=remote to a `loop engine` on this machine over HTTP
and over gRPC, each driven by wrk at the same concurrency, one digit a request.

    python -m benchmarks.bench_remote --connections 1,32 --seconds 8

Prints requests a second with p50 / p99 for each, and each remote one's ratio to in-process. The
engine shares this machine's cores with the service, wrk, Postgres and Redis, so the ratio is the
cost of the hop where the engine brings no accelerator; its point is a GPU pool elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import harness
from harness.processes import free_port, running
from harness.serve import add_loop_options, loop_serve
from loadtest import wrk
from models import digits, store
from models.triton import export_repository

logger = logging.getLogger("bench_remote")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_options(parser)
    parser.add_argument("--connections", default="1,32", help="wrk connections, comma-separated.")
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wrk.ensure_wrk()
    stored = store.get(args.model)
    body = {"samples": [digits.load().images[0].tolist()]}
    with (
        tempfile.TemporaryDirectory() as scratch,
        harness.throwaway(args.postgres, args.redis) as (database_url, prefix),
        contextlib.ExitStack() as stack,
    ):
        folder = Path(scratch)
        export_repository(stored, folder / "repository", number=store.version_number(stored))
        port, grpc_port = free_port(), free_port()
        command = [sys.executable, "-m", "service", "engine", "--repository", str(folder / "repository")]
        command += ["--port", str(port), "--grpc-port", str(grpc_port)]
        ready = f"http://127.0.0.1:{port}/v2/health/ready"
        stack.enter_context(running(command, dict(os.environ), ready_url=ready, log=folder / "engine.log"))
        targets = {"in process": {}, "remote, HTTP": {"LOOP_INFERENCE_URL": f"http://127.0.0.1:{port}"}}
        targets["remote, gRPC"] = {"LOOP_INFERENCE_URL": f"grpc://127.0.0.1:{grpc_port}"}
        rates: dict[tuple[str, int], float] = {}
        for n, (label, overrides) in enumerate(targets.items()):
            with loop_serve(
                f"{stored.name}:{stored.version}",
                database_url=database_url,
                redis_url=args.redis,
                prefix=f"{prefix}{n}",
                var_dir=folder / f"var{n}",
                log=folder / f"serve{n}.log",
                overrides={**overrides, "LOOP_INFERENCE": "remote"} if overrides else None,
            ) as url:
                wrk.run(f"{url}/predict", body, connections=8, seconds=2)  # warm
                for connections in (int(c) for c in args.connections.split(",")):
                    result = wrk.run(f"{url}/predict", body, connections=connections, seconds=args.seconds)
                    rates[(label, connections)] = result.requests_per_s
                    print(
                        f"{label}, c={connections}: {result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, {result.errors} errors"
                    )
    for (label, connections), rate in rates.items():
        if label != "in process":
            print(f"{label} / in process at c={connections}: {rate / rates[('in process', connections)]:.2f}")


if __name__ == "__main__":
    main()
