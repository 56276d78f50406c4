"""One run, one machine, one model, one load generator: our service against the alternatives.

    python -m benchmarks.bench_servers --concurrency 1,8,32,64 --seconds 10

Measures, after a warm-up, at each concurrency (closed loop, wrk, single-digit JSON requests):
throughput, p50, p99 and errors of
- ours: `loop serve` batched and unbatched (`LOOP_MAX_BATCH_SIZE=1`), prediction logging on
  (with its ingest worker) and off;
- bare BentoML: the same model behind `@bentoml.api(batchable=True)`, no logging; and BentoML's own
  way to batch across workers: two API workers calling one batchable service through
  `bentoml.depends`;
and the ceiling: ONNX Runtime in-process (one thread) at batch sizes 1, 32 and 128.
Writes results.json, results.md (table and ratios) and PNG plots of throughput and p99 against
concurrency to `--out`. wrk runs with one thread; its CPU use is reported beside each point, so the
share of the two cores the load generator took is visible.

- plain FastAPI + uvicorn, the same model, no batching, no logging, no access log: the cheapest
  Python server;
- a prototype of our path without BentoML and Starlette (benchmarks.peers.lean_asgi_peer: bare ASGI
  on uvicorn, the same checks, batcher and Redis log), 2 workers: what a front end of our own reaches;
- peers from the package registry, the same model, no logging: LitServe (Python front end,
  the closest in design to ours) and MOSEC (Rust front end, the fastest we know of); install them
  with `pip install -e '.[bench]'`. Both batch up to 64 with a 5 ms wait, as measured before.

Then, open loop (`--rates`): each target at fixed request rates (loadtest.openloop), latency from
each request's due time. `--model digits-wide` runs the compute-bound model instead (built with
random weights on first use), where batching pays.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

import harness
from loadtest import openloop, wrk
from models import digits, store
from models.runtime import DevicePreference, OnnxModel

logger = logging.getLogger("bench_servers")


@dataclass(frozen=True)
class Target:
    name: str
    command: list[str]
    env: dict[str, str]
    path: str = "/predict"  # where predictions are posted
    npy: bool = False  # the body as one .npy array (application/octet-stream) instead of JSON
    ready: str = "/readyz"  # answers 200 once the server can take them


@dataclass(frozen=True)
class OpenPoint:
    target: str
    rate: float
    answered_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    client_cpu: float
    send_lag_ms: float  # the generator's own worst lateness: a stall of the whole machine shows here


@dataclass(frozen=True)
class Point:
    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    client_cpu: float


OURS, OURS_2W = "ours batched, log on", "ours batched, log on, 2 workers"
SHARED = "ours batched, log on, 2 workers + shared inference"
SHARED_2T = "ours batched, log on, 2 workers + shared inference (2 ORT threads)"
DEPENDS = "bentoml depends (2 API workers + 1 batchable)"
LEAN = "lean asgi prototype, log on, 2 workers"
MOSEC, LITSERVE, BENTOML = "mosec (batch 64, 5 ms)", "litserve (batch 64, 5 ms)", "bare bentoml batchable"
FASTAPI, FASTAPI_2W = "plain fastapi (no batching)", "plain fastapi (no batching), 2 workers"
UNBATCHED, LOG_OFF = "ours unbatched, log on", "ours batched, log off"
RATIOS = [  # label, numerator, denominator: printed where both were measured
    ("ours / MOSEC", OURS, MOSEC),
    ("ours / LitServe", OURS, LITSERVE),
    ("ours / bare BentoML", OURS, BENTOML),
    ("ours / plain FastAPI", OURS, FASTAPI),
    ("batched / unbatched", OURS, UNBATCHED),
    ("logging on / off", OURS, LOG_OFF),
    ("ours 2 workers / MOSEC", OURS_2W, MOSEC),
    ("ours 2 workers / plain FastAPI", OURS_2W, FASTAPI),
    ("ours 2 workers / plain FastAPI 2 workers", OURS_2W, FASTAPI_2W),
    ("shared inference / self-contained (2 workers)", SHARED, OURS_2W),
    ("shared inference, 2 ORT threads / self-contained", SHARED_2T, OURS_2W),
    ("BentoML depends / shared inference", DEPENDS, SHARED),
    ("lean prototype / MOSEC", LEAN, MOSEC),
    ("lean prototype / ours 2 workers", LEAN, OURS_2W),
    ("lean prototype / plain FastAPI 2 workers", LEAN, FASTAPI_2W),
]


def ceiling(model_tag: str, seconds: float) -> dict[int, float]:
    """Samples per second of ONNX Runtime in-process, one intra-op thread, by batch size."""
    model = OnnxModel(store.get(model_tag).onnx_path, device=DevicePreference.CPU, intra_op_threads=1)
    images = digits.load().images
    out = {}
    for batch in (1, 32, 128):
        x = np.ascontiguousarray(np.resize(images, (batch, 8, 8)), dtype=np.float32)
        for _ in range(50):
            model.run(x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.run(x)
            runs += 1
        out[batch] = runs * batch / (time.perf_counter() - started)
    return out


def plot(points: list[Point], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({p.target for p in points}):
        mine = sorted((p for p in points if p.target == name), key=lambda p: p.concurrency)
        xs = [p.concurrency for p in mine]
        left.plot(xs, [p.requests_per_s for p in mine], marker="o", label=name)
        right.plot(xs, [p.p99_ms for p in mine], marker="o", label=name)
    for axis, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent connections")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput_p99.png", dpi=120)


def open_markdown(points: list[OpenPoint], rates: list[float]) -> str:
    by = {(p.target, p.rate): p for p in points}
    lines = [
        "Open loop (fixed request rate; latency from each request's due time):",
        "",
        "| target | "
        + " | ".join(f"{r:,.0f} req/s: answered/s (p50 / p99 ms, errors; send lag ms)" for r in rates)
        + " |",
        "|---" * (len(rates) + 1) + "|",
    ]
    for name in sorted({p.target for p in points}):
        cells = []
        for r in rates:
            p = by.get((name, r))
            cells.append(
                "-"
                if p is None
                else f"{p.answered_per_s:,.0f} ({p.p50_ms:.1f} / {p.p99_ms:.1f}, {p.errors}; {p.send_lag_ms:.0f})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cpu = max((p.client_cpu for p in points), default=0.0)
    lines += [
        "",
        f"The open-loop generator used at most {cpu:.2f} of a core. Send lag is how late the generator itself"
        " sent its latest request: where it is large, the whole machine stalled, not only the server.",
    ]
    return "\n".join(lines)


def markdown(points: list[Point], ceilings: dict[int, float], concurrencies: list[int]) -> str:
    by = {(p.target, p.concurrency): p for p in points}
    names = sorted({p.target for p in points})
    lines = ["| target | " + " | ".join(f"c={c} req/s (p50 / p99 ms)" for c in concurrencies) + " |"]
    lines.append("|---" * (len(concurrencies) + 1) + "|")
    for name in names:
        cells = []
        for c in concurrencies:
            p = by.get((name, c))
            cells.append("-" if p is None else f"{p.requests_per_s:,.0f} ({p.p50_ms:.1f} / {p.p99_ms:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ceiling_text = ", ".join(f"batch {b}: {v:,.0f} samples/s" for b, v in ceilings.items())
    lines += ["", f"Ceiling, ONNX Runtime in-process (1 thread): {ceiling_text}.", "", "Ratios (throughput):", ""]

    def ratio(a: str, b: str, c: int) -> str:
        pa, pb = by.get((a, c)), by.get((b, c))
        return (
            "-"
            if pa is None or pb is None or pb.requests_per_s == 0
            else f"{pa.requests_per_s / pb.requests_per_s:.2f}"
        )

    best_ceiling = max(ceilings.values(), default=0.0)

    def p50_ratio(a: str, b: str, c: int) -> str:
        pa, pb = by.get((a, c)), by.get((b, c))
        return "-" if pa is None or pb is None or pb.p50_ms == 0 else f"{pa.p50_ms / pb.p50_ms:.2f}"

    def of_ceiling(c: int) -> str:
        p = by.get((OURS, c))
        return "-" if p is None or not best_ceiling else f"{p.requests_per_s / best_ceiling:.3f}"

    for c in concurrencies:
        found = [f"ours / ceiling (best batch) {of_ceiling(c)}"] if of_ceiling(c) != "-" else []
        found += [f"{label} {r}" for label, a, b in RATIOS if (r := ratio(a, b, c)) != "-"]
        p50 = p50_ratio(OURS, FASTAPI, c)
        found += [] if p50 == "-" else [f"p50 ours / plain FastAPI {p50}"]
        lines.append(f"- c={c}: " + ("; ".join(found) or "-"))
    cpu = max((p.client_cpu for p in points), default=0.0)
    lines += ["", f"wrk used at most {cpu:.2f} of a core (one thread) at any point; the server had the rest."]
    return "\n".join(lines)


def make_targets(model: str, database_url: str, redis_url: str, prefix: str, out: Path) -> list[Target]:
    name, _, version = model.partition(":")
    loop = harness.LOOP_SERVE
    common = {
        "LOOP_MODEL_NAME": name,
        "LOOP_MODEL_TAG": version or "latest",
        "LOOP_DATABASE_URL": database_url,
        "LOOP_REDIS_URL": redis_url,
        "LOOP_REDIS_PREFIX": prefix,
        "LOOP_VAR_DIR": str(out / "var"),
        "LOOP_INGEST_METRICS_PORT": "0",
    }
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    return [
        Target(OURS, loop, {**common, "LOOP_LOG_PREDICTIONS": "true"}),
        Target(LOG_OFF, loop, {**common, "LOOP_LOG_PREDICTIONS": "false"}),
        Target(UNBATCHED, loop, {**common, "LOOP_MAX_BATCH_SIZE": "1"}),
        Target(OURS_2W, loop, {**common, "LOOP_WORKERS": "2"}),
        Target(
            SHARED,
            loop,
            {**common, "LOOP_WORKERS": "2", "LOOP_INFERENCE": "shared"},
        ),
        Target(
            SHARED_2T,
            loop,
            {**common, "LOOP_WORKERS": "2", "LOOP_INFERENCE": "shared", "LOOP_ORT_THREADS": "2"},
        ),
        Target("ours batched, log on, npy body", loop, common, path="/predict/npy", npy=True),
        Target(
            BENTOML,
            [bentoml, "serve", "benchmarks.peers.bentoml_batchable:BareBatchable", "--port", "{port}"],
            {"LOOP_MODEL_TAG": model},
        ),
        Target(
            DEPENDS,
            [bentoml, "serve", "benchmarks.peers.bentoml_depends:DependsApi", "--port", "{port}"],
            {"LOOP_MODEL_TAG": model},
        ),
        Target(
            FASTAPI,
            [sys.executable, "-m", "benchmarks.peers.fastapi_peer", "--port", "{port}"],
            {"LOOP_MODEL_TAG": model},
        ),
        Target(
            FASTAPI_2W,
            [sys.executable, "-m", "benchmarks.peers.fastapi_peer", "--port", "{port}", "--workers", "2"],
            {"LOOP_MODEL_TAG": model},
        ),
        Target(
            LEAN,
            [sys.executable, "-m", "benchmarks.peers.lean_asgi_peer", "--port", "{port}", "--workers", "2"],
            {"LOOP_MODEL_TAG": model, "LOOP_REDIS_URL": redis_url, "LOOP_REDIS_PREFIX": prefix},
        ),
        Target(
            LITSERVE,
            [sys.executable, "-m", "benchmarks.peers.litserve_peer", "--port", "{port}"],
            {"LOOP_MODEL_TAG": model},
        ),
        Target(
            MOSEC,
            [sys.executable, "-m", "benchmarks.peers.mosec_peer", "--port", "{port}"],
            {"LOOP_MODEL_TAG": model},
            path="/inference",
            ready="/",
        ),
    ]


def measure(
    target: Target,
    port: int,
    *,
    concurrencies: list[int],
    rates: list[float],
    seconds: float,
    warmup: float,
    log: Path,
) -> tuple[list[Point], list[OpenPoint]]:
    """Start the target, sweep concurrencies (closed loop) then rates (open loop), stop it."""
    image = digits.load().images[:1]
    body: dict[str, object] | bytes = {"samples": image.tolist()}
    if target.npy:
        buffer = io.BytesIO()
        np.save(buffer, image)
        body = buffer.getvalue()
    points, open_points = [], []
    process = harness.start(
        [part.replace("{port}", str(port)) for part in target.command],
        {**target.env, "LOOP_PORT": str(port)},
        ready_url=f"http://127.0.0.1:{port}{target.ready}",
        log=log,
    )
    try:
        url = f"http://127.0.0.1:{port}{target.path}"
        for c in concurrencies:
            wrk.run(url, body, connections=c, seconds=warmup)
            r = wrk.run(url, body, connections=c, seconds=seconds)
            points.append(Point(target.name, c, r.requests_per_s, r.p50_ms, r.p99_ms, r.errors, r.client_cpu))
            logger.info("%s c=%d: %s", target.name, c, r)
        for rate in rates:
            o = openloop.run(url, body, rate=rate, seconds=seconds)
            open_points.append(
                OpenPoint(
                    target.name, rate, o.answered_per_s, o.p50_ms, o.p99_ms, o.errors, o.client_cpu, o.max_send_lag_ms
                )
            )
            logger.info("%s rate=%.0f: %s", target.name, rate, o)
    finally:
        harness.stop(process)
    return points, open_points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--model", default="digits-cnn:latest", help="or digits-wide: compute-bound")
    parser.add_argument("--rates", default="250,500,1000", help="open-loop request rates ('' for none)")
    parser.add_argument("--only", default="", help="target names to run, separated by ; (default: all)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    out = args.out or Path("var/bench") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    database, database_url = harness.create_database(args.postgres)
    prefix = harness.new_prefix()
    if args.model.startswith("digits-wide") and not store.exists(args.model):
        from models.pipeline import build_wide_model

        build_wide_model(name=args.model.partition(":")[0])
    rates = [float(r) for r in args.rates.split(",") if r]
    targets = make_targets(args.model, database_url, args.redis, prefix, out)
    if args.only:
        wanted = set(args.only.split(";"))
        targets = [t for t in targets if t.name in wanted]
    points: list[Point] = []
    open_points: list[OpenPoint] = []
    try:
        ceilings = ceiling(args.model, seconds=min(args.seconds, 5))
        logger.info("ceiling: %s", ceilings)
        for i, target in enumerate(targets):
            closed, opened = measure(
                target,
                3990 + i,
                concurrencies=concurrencies,
                rates=rates,
                seconds=args.seconds,
                warmup=args.warmup,
                log=out / f"{i}.log",
            )
            points += closed
            open_points += opened
    finally:
        harness.drop_database(args.postgres, database)
        harness.delete_keys(args.redis, prefix)

    (out / "results.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "ceiling": ceilings,
                "points": [asdict(p) for p in points],
                "open_loop": [asdict(p) for p in open_points],
            },
            indent=2,
        )
    )
    report = f"Model: {args.model}\n\n" + markdown(points, ceilings, concurrencies)
    if open_points:
        report += "\n\n" + open_markdown(open_points, rates)
    (out / "results.md").write_text(report + "\n")
    plot(points, out)
    print(report)
    print(f"\nresults, plots and server logs in {out}")


if __name__ == "__main__":
    main()
