"""The `loop` command line: train and import models, inspect the store, run the service and its
workers, manage users and dead letters; the data-loop commands are in `service/cli_loop.py`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from models import store
from service import cli_loop
from service.settings import Settings

logger = logging.getLogger("loop")

ROOT = Path(__file__).resolve().parent.parent


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Loop: serve models, store every prediction, learn from reviewers."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    _configure_logging(verbose)


@main.command()
@cli_loop.model_option
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the protocol's epochs.")
@click.option("--if-missing", is_flag=True, help="Do nothing if the store already has the model.")
def train(model_name: str | None, epochs: int | None, if_missing: bool) -> None:
    """Train a model and save it to the BentoML model store.

    The default model trains on the data it ships with, without a database. Any other model
    trains with its spec's trainer on a training version compiled from its imported original
    data (`loop datasets import`) and the labels so far, and goes through the gate like a retrain."""
    settings = Settings()
    name = model_name or settings.model_name
    ref = settings.model_ref if name == settings.model_name else f"{name}:latest"
    if if_missing and store.exists(ref):
        click.echo(f"{ref} is in the model store; not training")
        return
    from models.builtin import has_bundled_originals

    if not has_bundled_originals(name):
        with cli_loop.connection(settings) as conn, cli_loop.clean_errors():
            dataset = cli_loop.compile_version(conn, settings, name)
            click.echo(f"training version {dataset.id}: {dataset.rows} rows  {json.dumps(dataset.per_class)}")
            cli_loop.retrain_version(conn, settings, name, dataset, epochs=epochs)
        return
    from models.pipeline import build_bundled_model  # torch loads only when training
    from models.train import EpochMetrics, TrainConfig

    config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    with click.progressbar(length=config.epochs, label="training", file=sys.stderr) as bar:

        def on_epoch(m: EpochMetrics) -> None:
            bar.update(1)
            logger.debug("epoch %d train loss %.4f val error %s", m.epoch, m.train_loss, m.validation_error)

        result = build_bundled_model(name=name, split_path=settings.split_path, config=config, on_epoch=on_epoch)
    click.echo(
        f"saved {result.stored.tag}: validation accuracy {result.evaluation.accuracy:.4f}, "
        f"ECE {result.evaluation.ece:.4f}, ONNX parity max abs diff {result.parity_max_abs_diff:.2e}"
    )


@main.command()
@click.argument("tag", required=False)
def show(tag: str | None) -> None:
    """Print what the store records about a model (default: the configured one)."""
    ref = tag or Settings().model_ref
    try:
        stored = store.get(ref)
    except store.ModelNotFound as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"tag": stored.tag, **stored.card.to_metadata()}, indent=2))


@main.group()
def models() -> None:
    """The models in the BentoML store: import a team's ONNX classifier, list them."""


@models.command("import")
@click.argument("name")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The exported classifier (dynamic batch axis).")  # fmt: skip
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Its model spec, YAML or TOML (see models/spec.py).")  # fmt: skip
def models_import(name: str, onnx_path: Path, spec_path: Path) -> None:
    """Check an ONNX classifier against its spec, run it once, and store it as a new version of NAME."""
    from models import spec
    from models.importer import ImportRefused, import_model

    try:
        stored = import_model(name, onnx_path, spec.load(spec_path))
    except (spec.SpecError, ImportRefused) as exc:
        raise click.ClickException(str(exc)) from None
    model_spec = stored.card.model_spec
    click.echo(
        f"imported {stored.tag}: {model_spec.input.kind} input {list(stored.card.signature.input_shape)}, "
        f"{len(model_spec.classes)} classes, output {model_spec.output_kind}; "
        f"serve it with LOOP_MODELS={stored.name} (or beside others: LOOP_MODELS={Settings().model_name},{stored.name})"
    )


@models.command("list")
@click.argument("name", required=False)
def models_list(name: str | None) -> None:
    """Every stored model version (of NAME, if given), oldest first: tag, input, classes, data."""
    for stored in store.list_models(name):
        card = stored.card
        shape = "x".join(str(d) for d in card.signature.input_shape)
        accuracy = card.metrics.get("accuracy")
        scored = "" if accuracy is None else f"  accuracy {accuracy:.4f}"
        click.echo(
            f"{stored.tag}\t{card.model_spec.input.kind} {shape}\t{len(card.signature.class_names)} classes"
            f"\t{card.dataset_id}{scored}"
        )


def _require(url: str | None, name: str) -> str:
    if url is None:
        raise click.ClickException(f"{name} is not set; `loop serve` starts embedded servers and sets it")
    return url


@main.group()
def users() -> None:
    """Reviewers and admins (LOOP_DATABASE_URL, else the running embedded database)."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["reviewer", "admin"]), default="reviewer", show_default=True)
def users_add(name: str, role: str) -> None:
    """Create a user and print its API token (shown this once)."""
    import psycopg

    from feedback import review_store
    from feedback.migrate import migrate as apply

    with psycopg.connect(cli_loop.database_url(Settings()), autocommit=True, connect_timeout=5) as conn:
        apply(conn)
        try:
            user, token = review_store.create_user(conn=conn, name=name, role=review_store.Role(role))
        except (review_store.Conflict, review_store.Invalid) as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"created {user.role.value} {user.name!r}; token (shown once):", err=True)
    click.echo(token)


@users.command("list")
def users_list() -> None:
    """List users."""
    import psycopg

    from feedback import review_store

    with psycopg.connect(cli_loop.database_url(Settings()), connect_timeout=5) as conn:
        for user in review_store.list_users(conn=conn):
            click.echo(f"{user.id}\t{user.name}\t{user.role.value}")


@main.command()
def migrate() -> None:
    """Apply the database migrations not yet applied (LOOP_DATABASE_URL)."""
    import psycopg

    from feedback.migrate import migrate as apply

    with psycopg.connect(_require(Settings().database_url, "LOOP_DATABASE_URL"), connect_timeout=5) as conn:
        applied = apply(conn)
    click.echo(f"applied {len(applied)} migration(s)" if applied else "the schema is up to date")


@main.group("dead-letters")
def dead_letters_group() -> None:
    """Predictions the ingest worker could not store: inspect them, replay them once fixed."""


@dead_letters_group.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Most entries shown.")
def dead_letters_list(limit: int) -> None:
    """The oldest dead letters: entry id, prediction id and why they were refused."""
    import redis

    from feedback import dead_letters
    from feedback.keys import Keys

    settings = Settings()
    keys = Keys(settings.redis_prefix)
    with redis.Redis.from_url(cli_loop.redis_url(settings), socket_connect_timeout=2) as client:
        total = dead_letters.count(client, keys)
        shown = dead_letters.read(client, keys, limit=limit)
    for letter in shown:
        reason = " ".join(letter.reason.split())  # one line per entry
        click.echo(f"{letter.entry_id}\t{letter.prediction_id}\t{reason}")
    click.echo(
        f"{total} dead letters in {keys.dead_letters}" + (f" ({len(shown)} shown)" if total > len(shown) else ""),
        err=True,
    )


@dead_letters_group.command("replay")
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
def dead_letters_replay(entry_ids: tuple[str, ...], everything: bool) -> None:
    """Move dead letters back onto the prediction stream (after fixing why they were refused)."""
    import redis

    from feedback import dead_letters
    from feedback.keys import Keys

    if bool(entry_ids) == everything:
        raise click.UsageError("name the entries to replay, or pass --all")
    settings = Settings()
    keys = Keys(settings.redis_prefix)
    with redis.Redis.from_url(cli_loop.redis_url(settings), socket_connect_timeout=2) as client:
        try:
            moved = dead_letters.replay(client, keys, entry_ids=None if everything else entry_ids)
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from None
        except redis.ResponseError as exc:  # not a stream id at all
            raise click.ClickException(str(exc)) from None
    click.echo(f"replayed {moved} entries onto {keys.stream}; the ingest worker stores each once")


@main.command()
def ingest() -> None:
    """Run an ingest worker: Redis stream -> Postgres, until SIGTERM or Ctrl-C."""
    import threading

    import prometheus_client
    import psycopg
    import redis

    from feedback.ingest import IngestConfig, IngestStats, IngestWorker, lag
    from feedback.keys import Keys
    from feedback.migrate import migrate as apply

    settings = Settings()
    database_url = _require(settings.database_url, "LOOP_DATABASE_URL")
    redis_url = _require(settings.redis_url, "LOOP_REDIS_URL")
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        apply(conn)
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=5)
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
    worker = IngestWorker(
        redis_client=client,
        connect=lambda: psycopg.connect(database_url, autocommit=True, connect_timeout=3),
        keys=keys,
        consumer=settings.ingest_consumer or f"{socket.gethostname()}-{os.getpid()}",
        config=IngestConfig(
            batch_size=settings.ingest_batch_size,
            claim_idle_ms=settings.ingest_claim_idle_ms,
            linger_ms=settings.ingest_linger_ms,
        ),
        on_stats=on_stats,
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.run(stop)


@main.command()
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


@main.command()
@click.option("--train-if-missing/--no-train", default=True, help="Train the default model if absent.")
@click.option(
    "--ingest/--no-ingest",
    default=True,
    help="Run an ingest worker beside the service (--no-ingest: it runs elsewhere).",
)
def serve(train_if_missing: bool, ingest: bool) -> None:
    """Run everything: Postgres and Redis (embedded unless configured), the ingest worker and the
    BentoML service. Ctrl-C stops it all; data stays under var/."""
    from models.runtime import cuda_devices
    from service.inference import gpu_pins

    settings = Settings()
    if not store.exists(settings.model_ref):
        if not train_if_missing:
            raise click.ClickException(f"{settings.model_ref} is not in the model store; run `loop train`")
        click.get_current_context().invoke(train)
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if settings.log_predictions:
            env["LOOP_DATABASE_URL"] = settings.database_url or _embedded_postgres(settings, stack)
            env["LOOP_REDIS_URL"] = settings.redis_url or _embedded_redis(settings, stack)
        bentoml = str(Path(sys.executable).with_name("bentoml"))
        children = {
            "service": [
                bentoml, "serve", "service.app:Predictor", "--working-dir", str(ROOT),
                "--host", settings.host, "--port", str(settings.port),
            ],
        }  # fmt: skip
        if settings.shared_inference:
            pins = gpu_pins(settings.inference_processes, cuda_devices()[0], env.get("CUDA_VISIBLE_DEVICES"))
            env["LOOP_INFERENCE_PROCESSES"] = str(len(pins))
            for i, gpu in enumerate(pins):
                pin = [] if gpu is None else ["--gpu", gpu]
                children[f"inference-{i}"] = [sys.executable, "-m", "service", "inference", "--index", str(i), *pin]
        if settings.log_predictions and ingest:
            children["ingest"] = [sys.executable, "-m", "service", "ingest"]
        if settings.log_predictions:
            # Migrations run before the children start, so neither races the other over them.
            subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, check=True)
        env["BENTOML_CONFIG_OPTIONS"] = " ".join(
            filter(None, [env.get("BENTOML_CONFIG_OPTIONS", ""), f"services.loop.workers={settings.workers}"])
        )
        what = f"{settings.model_name} (the champion)" if settings.follows_champion else settings.model_ref
        click.echo(f"serving {what} on http://{settings.host}:{settings.port} (OpenAPI page at /)")
        code = _supervise(children, env)
    sys.exit(code)


def _embedded_postgres(settings: Settings, stack: contextlib.ExitStack) -> str:
    from service.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.var_dir / "postgres", settings.embedded_postgres_port)
    url = server.start()
    stack.callback(server.stop)
    return url


def _embedded_redis(settings: Settings, stack: contextlib.ExitStack) -> str:
    from service.embedded import EmbeddedRedis

    server = EmbeddedRedis(settings.var_dir / "redis", settings.embedded_redis_port)
    url = server.start()
    stack.callback(server.stop)
    return url


def _death_signal() -> Callable[[], None] | None:
    """A function for a child to run before exec: get SIGTERM when `loop serve` dies, however it
    dies, so the service and ingest worker are never orphaned (Linux only). libc is resolved here,
    in the parent, so that the child does no more than one system call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


RESTARTS_PER_MINUTE = 5  # a child that dies more often than this is broken, not unlucky


def _supervise(commands: dict[str, list[str]], env: dict[str, str]) -> int:
    """Run the children until Ctrl-C or SIGTERM. A child that dies is started again after a
    back-off (1 s, doubling to 30 s), as an orchestrator would; one that dies more than
    `RESTARTS_PER_MINUTE` times in a minute stops everything."""
    die_with_parent = _death_signal()

    def launch(name: str) -> subprocess.Popen[bytes]:
        # preexec_fn runs one prctl call, resolved before the fork (see _death_signal).
        return subprocess.Popen(commands[name], env=env, start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509

    processes = {name: launch(name) for name in commands}
    deaths: dict[str, list[float]] = {name: [] for name in commands}
    due: dict[str, float] = {}  # when a dead child is started again
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not stopping:
            now = time.monotonic()
            for name, process in processes.items():
                if name in due or process.poll() is None:
                    continue
                recent = [t for t in deaths[name] if now - t < 60] + [now]
                deaths[name] = recent
                if len(recent) > RESTARTS_PER_MINUTE:
                    logger.error("%s exited %d times in a minute (last code %s); stopping", name, len(recent),
                                 process.returncode)  # fmt: skip
                    code, stopping = process.returncode or 1, True
                    break
                wait = min(30.0, 2.0 ** (len(recent) - 1))
                logger.error("%s exited with code %s; starting it again in %.0f s", name, process.returncode, wait)
                due[name] = now + wait
            for name, when in list(due.items()):
                if not stopping and time.monotonic() >= when:
                    processes[name] = launch(name)
                    del due[name]
                    logger.info("%s started again (pid %d)", name, processes[name].pid)
            time.sleep(0.2)
    finally:
        logger.info("stopping")
        # The service first (no new predictions), then the models it ran, then the ingest worker
        # (it drains what it holds).
        for name in ["service", *sorted(n for n in processes if n.startswith("inference")), "ingest"]:
            child = processes.get(name)
            if child is None or child.poll() is not None:
                continue
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in 30 s; killing it", name)
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


for _command in cli_loop.COMMANDS:
    main.add_command(_command)
