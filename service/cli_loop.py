"""`loop datasets|validation|retrain|promote|champion|experiments|demo-data`: the data loop from the command line.

Every command works on LOOP_DATABASE_URL (else the embedded database `loop serve` runs) and
announces promotions on LOOP_REDIS_URL (else the embedded Redis). Each takes `--model NAME`
(default LOOP_MODEL_NAME): the model's spec says its classes, its inputs and its trainer.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.demo_loop import demo_loop
from service.settings import Settings

if TYPE_CHECKING:
    import psycopg

    from feedback.datasets import LabelSchema, Originals
    from feedback.review_store import User
    from feedback.tracking import Tracking


def database_url(settings: Settings) -> str:
    """The configured database, else the embedded one `loop serve` runs (it must be running)."""
    return settings.database_url or f"postgresql://postgres@127.0.0.1:{settings.embedded_postgres_port}/loop"


def redis_url(settings: Settings) -> str:
    return settings.redis_url or f"redis://127.0.0.1:{settings.embedded_redis_port}/0"


@contextlib.contextmanager
def connection(settings: Settings) -> Iterator[psycopg.Connection]:
    import psycopg

    from feedback.migrate import migrate

    try:
        conn = psycopg.connect(database_url(settings), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise click.ClickException(
            f"cannot reach Postgres ({exc}); set LOOP_DATABASE_URL or run `loop serve` for the embedded one"
        ) from None
    with conn:
        migrate(conn)
        yield conn


@contextlib.contextmanager
def clean_errors() -> Iterator[None]:
    """Errors a user can fix are one line on stderr and exit status 1, not a traceback."""
    from feedback.review_store import Invalid
    from models.store import ModelNotFound

    try:
        yield
    except (Invalid, ModelNotFound, LookupError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


def _schema(model_name: str) -> LabelSchema:
    from feedback.datasets import LabelSchema
    from models.builtin import spec_of

    return LabelSchema.of(spec_of(model_name))


def _originals(conn: psycopg.Connection, settings: Settings, model_name: str) -> Originals | None:
    from feedback.datasets import originals_for

    return originals_for(conn, model_name, settings.split_path)


def model_option(function: Any) -> Any:
    """`--model NAME`, default LOOP_MODEL_NAME."""
    return click.option("--model", "model_name", help="Model name (default: LOOP_MODEL_NAME).")(function)


def _progress(stack: contextlib.ExitStack, label: str) -> Any:
    """A progress callback (done, expected) that draws a bar on stderr once it is first called."""
    bar: list[Any] = []

    def progress(done: int, expected: int) -> None:
        if not bar:
            bar.append(stack.enter_context(click.progressbar(length=expected, label=label, file=sys.stderr)))
        bar[0].update(done - bar[0].pos)

    return progress


def _admin(conn: psycopg.Connection, name: str | None, *, required: bool) -> User | None:
    from feedback import review_store

    if name is None:
        if required:
            raise click.ClickException("this is an admin action: name the admin with --admin NAME")
        return None
    user = review_store.get_user(conn=conn, name=name)
    if user is None or user.role is not review_store.Role.ADMIN:
        raise click.ClickException(f"{name!r} is not an admin (see `loop users list`)")
    return user


def _tracking(settings: Settings) -> Tracking:
    from feedback.tracking import Tracking

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return Tracking(tracking_uri=settings.tracking_uri, artifact_uri=settings.artifact_uri)


def _announcer(settings: Settings) -> Any:
    import redis

    from feedback.keys import Keys
    from feedback.use_cases import announcer as on_redis

    announce = on_redis(redis_url(settings), Keys(settings.redis_prefix))

    def announcer(model_name: str, version: str) -> None:
        try:
            announce(model_name, version)
        except redis.RedisError as exc:
            click.echo(f"warning: promotion recorded but not announced ({exc}); workers pick it up on start", err=True)

    return announcer


def _demo_data_names() -> list[str]:
    from models.builtin import DEMO_DATA

    return list(DEMO_DATA)


def _version_line(v: Any) -> str:
    watermark = "" if v.watermark is None else f" watermark {v.watermark}"
    return f"{v.id}  {v.kind.value:<10} {v.rows:>9} rows{watermark}  {v.created_at:%Y-%m-%d %H:%M}  {v.uri}"


# -- datasets -------------------------------------------------------------------------------------


@click.group()
def datasets() -> None:
    """Versioned training sets compiled from the current labels."""


def compile_version(
    conn: psycopg.Connection, settings: Settings, model_name: str, *, watermark: int | None = None,
    original: bool = True, actor: User | None = None,
) -> Any:  # fmt: skip
    """Freeze the validation version if need be (from the original split, else from verdicts) and
    compile a training version, with a progress bar."""
    from feedback.use_cases import compile_with_validation

    with contextlib.ExitStack() as stack:
        return compile_with_validation(
            conn=conn, model_name=model_name, schema=_schema(model_name),
            originals=lambda: _originals(conn, settings, model_name), include_original=original,
            root_url=settings.datasets_root, watermark=watermark, actor=actor, progress=_progress(stack, "compiling"),
        )  # fmt: skip


@datasets.command("import")
@click.argument("name")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--validation-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True)
@click.option("--admin", "admin_name", help="Admin to record as the author.")
def datasets_import(name: str, source: Path, seed: int, validation_fraction: float, admin_name: str | None) -> None:
    """Import model NAME's original data once and freeze its validation split.

    SOURCE is a folder with one sub-folder of images per class (an image model), or an .npz file
    of `inputs` and `labels` (a tensor model). The classes must be the model's."""
    import time

    from feedback import datasets as ds

    settings = Settings()
    started = time.perf_counter()
    with connection(settings) as conn, clean_errors(), contextlib.ExitStack() as stack:
        imported = ds.import_originals(
            conn=conn, model_name=name, schema=_schema(name), source=source, root_url=settings.datasets_root,
            seed=seed, validation_fraction=validation_fraction, actor=_admin(conn, admin_name, required=False),
            progress=_progress(stack, "reading"),
        )  # fmt: skip
    o, v = imported.original, imported.validation
    click.echo(
        f"imported {name}'s original data in {time.perf_counter() - started:.1f} s\n"
        f"  original   {o.id}: {o.rows} rows  {json.dumps(o.per_class)}\n"
        f"  validation {v.id}: {v.rows} rows (frozen)  {json.dumps(v.per_class)}"
    )


@datasets.command("compile")
@model_option
@click.option("--watermark", type=click.IntRange(min=0), help="Highest annotation revision to include (default: all).")
@click.option(
    "--original/--no-original",
    default=True,
    show_default=True,
    help="Include the original training data (if the model has any).",
)
@click.option("--admin", "admin_name", help="Admin to record as the author.")
def datasets_compile(model_name: str | None, watermark: int | None, original: bool, admin_name: str | None) -> None:
    """Compile a training version; prints its id (DVC's directory hash)."""
    settings = Settings()
    name = model_name or settings.model_name
    with connection(settings) as conn, clean_errors():
        actor = _admin(conn, admin_name, required=False)
        version = compile_version(conn, settings, name, watermark=watermark, original=original, actor=actor)
    click.echo(
        f"training version {version.id}: {version.rows} rows at watermark {version.watermark}, "
        f"validation {version.validation_id}\n  per class: {json.dumps(version.per_class)}\n  {version.uri}"
    )


@datasets.command("list")
@model_option
def datasets_list(model_name: str | None) -> None:
    """List original, training and validation versions, oldest first."""
    from feedback import dataset_store

    settings = Settings()
    with connection(settings) as conn:
        for v in dataset_store.list_versions(conn=conn, model_name=model_name or settings.model_name):
            click.echo(_version_line(v))


def _version(version_id: str) -> Any:
    from feedback import dataset_store

    with connection(Settings()) as conn:
        version = dataset_store.get_version(conn=conn, version_id=version_id)
    if version is None:
        raise click.ClickException(f"no dataset version {version_id} (see `loop datasets list`)")
    return version


@datasets.command("show")
@click.argument("version_id")
def datasets_show(version_id: str) -> None:
    """Print a version's manifest."""
    version = _version(version_id)
    click.echo(json.dumps({"id": version.id, "uri": version.uri, **version.manifest}, indent=2))


@datasets.command("verify")
@click.argument("version_id")
def datasets_verify(version_id: str) -> None:
    """Hash a version's files again and compare with its id (DVC's directory hash)."""
    from feedback.datasets import verify

    version = _version(version_id)
    try:
        verify(version.uri, version.id)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{version.id}: the files at {version.uri} hash to its id")


# -- validation -----------------------------------------------------------------------------------


@click.group()
def validation() -> None:
    """The frozen validation set: show it, or fix labels into a new version (admin)."""


@validation.command("show")
@model_option
def validation_show(model_name: str | None) -> None:
    """The current validation version and its ancestors."""
    from feedback import dataset_store
    from feedback.dataset_store import Kind

    settings = Settings()
    name = model_name or settings.model_name
    with connection(settings) as conn:
        versions = dataset_store.list_versions(conn=conn, model_name=name, kind=Kind.VALIDATION)
    if not versions:
        raise click.ClickException("no validation version yet: `loop datasets compile` freezes it")
    for v in versions:
        click.echo(_version_line(v) + ("  (current)" if v is versions[-1] else ""))


@validation.command("fix")
@model_option
@click.option("--item", "items", multiple=True, required=True, metavar="ITEM=LABEL", help="Item id and right label.")
@click.option("--reason", required=True, help="Why the labels were wrong.")
@click.option("--admin", "admin_name", required=True, help="The admin making the change.")
def validation_fix(model_name: str | None, items: tuple[str, ...], reason: str, admin_name: str) -> None:
    """Fix labels: a new validation version; every model compared on the old one is re-evaluated."""
    from feedback import datasets as ds
    from feedback.use_cases import fix_and_reevaluate

    fixes = []
    for item in items:
        item_id, sep, label = item.rpartition("=")
        if not sep or not item_id or not label:
            raise click.BadParameter(f"{item!r} is not ITEM=LABEL", param_hint="--item")
        fixes.append(ds.LabelFix(item_id=item_id, label=label, reason=reason))
    settings = Settings()
    name = model_name or settings.model_name
    with connection(settings) as conn, clean_errors():
        actor = _admin(conn, admin_name, required=True)
        assert actor is not None
        fixed = fix_and_reevaluate(
            conn=conn, model_name=name, fixes=fixes, schema=_schema(name), root_url=settings.datasets_root, actor=actor
        )
        click.echo(f"validation version {fixed.new.id} replaces {fixed.old.id}")
        for name, version, accuracy in fixed.reevaluated:
            click.echo(f"  {name}:{version} re-evaluated: accuracy {accuracy:.4f}")


# -- retrain and promote --------------------------------------------------------------------------


def retrain_version(
    conn: psycopg.Connection, settings: Settings, model_name: str, dataset: Any, *, epochs: int | None = None,
    seed: int | None = None, margin: float | None = None, trainer: str | None = None,
) -> Any:  # fmt: skip
    """Retrain `model_name` on a training version with a progress bar per epoch; prints the outcome."""
    from dataclasses import replace

    from feedback import retrain as loop
    from models.train import EpochMetrics, TrainConfig

    config = TrainConfig()
    config = replace(config, epochs=epochs or config.epochs, seed=config.seed if seed is None else seed)
    with click.progressbar(length=config.epochs, label=f"training {model_name}", file=sys.stderr) as bar:

        def on_epoch(m: EpochMetrics) -> None:
            bar.update(1)

        result = loop.retrain(
            conn=conn, model_name=model_name, dataset=dataset, tracking=_tracking(settings), config=config,
            margin=settings.promotion_margin if margin is None else margin, announcer=_announcer(settings),
            on_epoch=on_epoch, trainer=trainer,
        )  # fmt: skip
    p = result.promotion
    click.echo(
        f"{result.build.stored.tag}: validation accuracy {result.evaluation.accuracy:.4f}, "
        f"ECE {result.evaluation.ece:.4f}, MLflow run {result.run_id}\n{p.decision.value}: {p.reason}"
    )
    return result


@click.command("retrain")
@model_option
@click.option("--dataset", "dataset_id", required=True, help="Training version id (`loop datasets list`).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the protocol's epochs (recorded in the run).")
@click.option("--seed", type=int, help="Override the protocol's seed (recorded in the run).")
@click.option("--margin", type=click.FloatRange(0, 1), help="Gate margin (default LOOP_PROMOTION_MARGIN).")
@click.option("--trainer", help="Train with this package.module:function instead of the spec's, and store it in the "
              "candidate's spec (models.trainers:fine_tune: the model's own imported graph, fine-tuned).")  # fmt: skip
def retrain(  # noqa: PLR0917  (each option is an argument, as click passes them)
    model_name: str | None, dataset_id: str, epochs: int | None, seed: int | None, margin: float | None,
    trainer: str | None,
) -> None:  # fmt: skip
    """Train on a dataset version with the model's trainer, evaluate, log to MLflow, and promote
    if it beats the champion."""
    from feedback import dataset_store

    settings = Settings()
    with connection(settings) as conn, clean_errors():
        dataset = dataset_store.get_version(conn=conn, version_id=dataset_id)
        if dataset is None:
            raise click.ClickException(f"no dataset version {dataset_id} (see `loop datasets list`)")
        name = model_name or dataset.model_name
        retrain_version(conn, settings, name, dataset, epochs=epochs, seed=seed, margin=margin, trainer=trainer)


@click.command("promote")
@model_option
@click.argument("version")
@click.option("--reason", required=True, help="Why the gate is overridden.")
@click.option("--admin", "admin_name", required=True, help="The admin taking the decision.")
def promote(model_name: str | None, version: str, reason: str, admin_name: str) -> None:
    """Make a stored model version champion regardless of the gate (recorded, announced)."""
    from feedback.champion import promote as force

    settings = Settings()
    with connection(settings) as conn, clean_errors():
        actor = _admin(conn, admin_name, required=True)
        assert actor is not None
        promotion = force(
            conn=conn, model_name=model_name or settings.model_name, model_version=version, reason=reason, actor=actor,
            announcer=_announcer(settings),
        )  # fmt: skip
    click.echo(f"{promotion.model_name}:{promotion.model_version} is champion ({promotion.decision.value})")


@click.command("champion")
@model_option
def champion(model_name: str | None) -> None:
    """The champion and every gate decision, oldest first."""
    from feedback import dataset_store

    settings = Settings()
    name = model_name or settings.model_name
    with connection(settings) as conn:
        history = dataset_store.promotions(conn=conn, model_name=name)
    if not history:
        click.echo(f"no decision recorded yet: services serve the newest {name} in the store")
    for p in history:
        accuracy = "" if p.accuracy is None else f" accuracy {p.accuracy:.4f}"
        click.echo(f"{p.at:%Y-%m-%d %H:%M:%S}  {p.model_version}  {p.decision.value:<9}{accuracy}  {p.reason}")


@click.command("experiments")
@model_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder (default var/reports).")
def experiments(model_name: str | None, out: Path | None) -> None:
    """Compare runs: validation error per epoch of each (log-log PNG) and a table of runs (Markdown)."""
    from feedback.report import write_report

    settings = Settings()
    with clean_errors():
        name = model_name or settings.model_name
        png, markdown = write_report(_tracking(settings), name, out or settings.var_dir / "reports" / name)
    click.echo(markdown.read_text())
    click.echo(f"plot: {png}")


@click.command("demo-data")
@click.argument("name", type=click.Choice(sorted(_demo_data_names())))
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=click.IntRange(min=1), help="Images per class (default: the data set's).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(name: str, folder: Path, per_class: int | None, seed: int) -> None:
    """Write a synthetic data set for a built-in model (e.g. `shapes`), made the same way everywhere."""
    import time

    from models.builtin import DEMO_DATA

    data = DEMO_DATA[name]
    if folder.exists() and any(folder.iterdir()):
        raise click.ClickException(f"{folder} is not empty; write the data set into a new folder")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        count = data.write(folder, per_class=per_class or data.default_per_class, seed=seed,
                           progress=_progress(stack, "drawing"))  # fmt: skip
    click.echo(
        f"wrote {count} images to {folder} in {time.perf_counter() - started:.1f} s: {data.description}\n"
        f"next: loop datasets import {data.model_name} {folder}"
    )


COMMANDS = (datasets, validation, retrain, promote, champion, experiments, demo_loop, demo_data)
