"""`loop serve|ingest|inference|migrate`: the whole service under one supervisor, and each of the
processes it runs on its own (as a container runs them)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from models import store
from service.cli.models import train
from service.settings import Settings

if TYPE_CHECKING:
    import redis

    from feedback.keys import Keys
    from feedback.predictions.ingest import IngestStats

logger = logging.getLogger("loop")


def _require(url: str | None, name: str) -> str:
    if url is None:
        raise click.ClickException(f"{name} is not set; `loop serve` starts embedded servers and sets it")
    return url


@click.command()
def migrate() -> None:
    """Apply the database migrations not yet applied (LOOP_DATABASE_URL)."""
    from feedback.migrate import migrate as apply
    from service import database

    with database.connect(_require(Settings().database_url, "LOOP_DATABASE_URL")) as conn:
        applied = apply(conn)
    click.echo(f"applied {len(applied)} migration(s)" if applied else "the schema is up to date")


def _ingest_metrics(settings: Settings, client: redis.Redis, keys: Keys) -> Callable[[IngestStats], None]:
    """Prometheus counters and lag gauges fed by the worker's stats (served on
    LOOP_INGEST_METRICS_PORT when it is set)."""
    import prometheus_client

    from feedback.predictions.ingest import IngestStats, lag

    counters = {
        name: prometheus_client.Counter(f"loop_ingest_{name}", doc)
        for name, doc in {
            "ingested": "Rows newly stored in Postgres",
            "duplicates": "Entries whose prediction id was already stored",
            "dead": "Entries moved to the dead-letter stream",
            "claimed": "Entries taken over from a dead consumer",
        }.items()
    }
    lag_entries = prometheus_client.Gauge("loop_stream_lag_entries", "Entries not yet acknowledged")
    lag_seconds = prometheus_client.Gauge("loop_stream_lag_seconds", "Age of the oldest unacknowledged entry")
    seen = IngestStats()

    def on_stats(stats: IngestStats) -> None:
        for name, counter in counters.items():
            counter.inc(getattr(stats, name) - getattr(seen, name))
            setattr(seen, name, getattr(stats, name))
        entries, seconds = lag(client, keys)
        lag_entries.set(entries)
        lag_seconds.set(seconds)

    if settings.ingest_metrics_port:
        try:
            prometheus_client.start_http_server(settings.ingest_metrics_port, addr="127.0.0.1")
        except OSError as exc:
            logger.warning("no metrics endpoint: port %d: %s", settings.ingest_metrics_port, exc)
    return on_stats


@click.command()
def ingest() -> None:
    """Run an ingest worker: Redis stream -> Postgres, until SIGTERM or Ctrl-C."""
    import threading

    import redis

    from feedback.keys import Keys
    from feedback.migrate import migrate as apply
    from feedback.predictions import blobs
    from feedback.predictions.ingest import IngestConfig, IngestWorker
    from service import database

    settings = Settings()
    database_url = _require(settings.database_url, "LOOP_DATABASE_URL")
    redis_url = _require(settings.redis_url, "LOOP_REDIS_URL")
    with database.connect(database_url) as conn:
        apply(conn)
        blobs.attach(conn, settings.blob_store())  # large inputs go there before their rows
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=5)
    worker = IngestWorker(
        redis_client=client,
        connect=lambda: database.connect(database_url, connect_timeout_s=3),
        keys=keys,
        consumer=settings.ingest_consumer or f"{socket.gethostname()}-{os.getpid()}",
        config=IngestConfig(
            batch_size=settings.ingest_batch_size,
            claim_idle_ms=settings.ingest_claim_idle_ms,
            linger_ms=settings.ingest_linger_ms,
        ),
        on_stats=_ingest_metrics(settings, client, keys),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=_upkeep, args=(settings, database_url, stop), name="upkeep", daemon=True).start()
    threading.Thread(target=_health, args=(settings, database_url, stop), name="health", daemon=True).start()
    worker.run(stop)


def _upkeep(settings: Settings, database_url: str, stop: threading.Event) -> None:
    """Partitions ahead and retention every LOOP_MAINTENANCE_INTERVAL_S, by one ingest worker at a
    time (the others find the lock taken and wait for the next round)."""
    from feedback.use_cases import maintain
    from service import database

    while not stop.is_set():
        try:
            with database.connect(database_url, connect_timeout_s=3) as conn:
                if conn.execute("SELECT pg_try_advisory_lock(%s)", (_UPKEEP_LOCK,)).fetchone() == (True,):
                    done = maintain(
                        conn, retention_days=settings.retention_days, ahead_days=settings.partitions_ahead_days
                    )
                    for expired in done.expiring:
                        logger.info("retention: %s", expired.describe())
        except Exception:  # the next round tries again; ingesting goes on regardless
            logger.exception("the prediction log's upkeep failed")
        stop.wait(settings.maintenance_interval_s)


def _health(settings: Settings, database_url: str, stop: threading.Event) -> None:
    """Fold new predictions into the health windows every LOOP_HEALTH_INTERVAL_S (each model by one
    ingest worker at a time: the others find its cursor locked)."""
    from datetime import timedelta

    from feedback.datasets import live
    from feedback.health import advance_all
    from service import database

    every = timedelta(hours=settings.live_validation_refresh_hours)
    while not stop.is_set():
        try:
            with database.connect(database_url, connect_timeout_s=3) as conn:
                advance_all(conn, config=settings.health_config, stop=stop)
                live.refresh(conn, root_url=settings.datasets_root, every=every, days=settings.live_validation_days,
                             min_judged=settings.live_validation_min_judged)  # fmt: skip
        except Exception:  # the next round tries again; ingesting goes on regardless
            logger.exception("the health pass failed")
        stop.wait(settings.health_interval_s)


_UPKEEP_LOCK = 0x7570  # advisory lock (session): one ingest worker keeps the log up at a time


@click.command()
@click.option("--index", type=click.IntRange(min=0), default=0, help="Which process (its socket) this is.")
@click.option("--gpu", default=None, help="Pin this process to one GPU (a CUDA_VISIBLE_DEVICES entry).")
def inference(index: int, gpu: str | None) -> None:
    """Run a shared inference process (LOOP_INFERENCE=shared; `loop serve` starts one per GPU): one
    ONNX Runtime session per model version for its service workers, their batches merged."""
    from service.inference import InferenceHost, onnx_opener, run_host

    settings = Settings()
    if not settings.shared_inference:
        raise click.ClickException("LOOP_INFERENCE is 'worker': each worker runs its own sessions")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before ONNX Runtime first asks the driver
    host = InferenceHost(
        onnx_opener(settings.device, settings.ort_threads),
        max_batch_size=settings.inference_max_batch_size,
        max_latency_s=settings.max_latency_ms / 1000,
    )
    run_host(host, settings.inference_socket_for(index))


@click.command()
@click.option(
    "--repository",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="A Triton model repository (`loop models export-triton` writes one).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None, help="gRPC port (none: HTTP only).")
def engine(repository: Path, host: str, port: int, grpc_port: int | None) -> None:
    """Serve the ONNX models of a Triton model repository over the Open Inference Protocol, raw graph
    in and out, for services with LOOP_INFERENCE=remote where no Triton runs (LOOP_DEVICE,
    LOOP_ORT_THREADS, LOOP_INFERENCE_MAX_BATCH_SIZE and LOOP_MAX_LATENCY_MS apply)."""
    from service.engine import Repository, run

    settings = Settings()
    models = Repository(
        repository,
        device=settings.device,
        ort_threads=settings.ort_threads,
        max_batch_size=settings.inference_max_batch_size,
        max_latency_s=settings.max_latency_ms / 1000,
    )
    run(models, host=host, port=port, grpc_port=grpc_port)


@click.command()
@click.option("--train-if-missing/--no-train", default=True, help="Train the default model if absent.")
@click.option(
    "--ingest/--no-ingest",
    default=True,
    help="Run an ingest worker beside the service (--no-ingest: it runs elsewhere).",
)
def serve(train_if_missing: bool, ingest: bool) -> None:
    """Run everything: Postgres and Redis (embedded unless configured), the ingest worker and the
    BentoML service. Ctrl-C stops it all; data stays under var/."""
    from service import supervisor

    settings = Settings()
    if not store.exists(settings.model_ref):
        if not train_if_missing:
            raise click.ClickException(f"{settings.model_ref} is not in the model store; run `loop train`")
        click.get_current_context().invoke(train)
    with contextlib.ExitStack() as stack:
        commands, env = supervisor.prepare(settings, stack, ingest=ingest)
        what = f"{settings.model_name} (the champion)" if settings.follows_champion else settings.model_ref
        click.echo(f"serving {what} on http://{settings.host}:{settings.port} (OpenAPI page at /)")
        code = supervisor.supervise(commands, env)
    sys.exit(code)
