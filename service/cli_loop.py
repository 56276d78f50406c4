"""`loop datasets|validation|retrain|promote|champion|experiments`: the data loop from the command line.

Every command works on LOOP_DATABASE_URL (else the embedded database `loop serve` runs) and
announces promotions on LOOP_REDIS_URL (else the embedded Redis).
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
def _connection(settings: Settings) -> Iterator[psycopg.Connection]:
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
def _clean_errors() -> Iterator[None]:
    """Errors a user can fix are one line on stderr and exit status 1, not a traceback."""
    from feedback.review_store import Invalid
    from models.store import ModelNotFound

    try:
        yield
    except (Invalid, ModelNotFound, LookupError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


def _schema() -> LabelSchema:
    from feedback.datasets import LabelSchema
    from models.digits import digits_signature

    return LabelSchema.of(digits_signature())


def _originals(settings: Settings) -> Originals:
    from feedback.datasets import digits_originals
    from models.digits import DEFAULT_MODEL_NAME

    if settings.model_name != DEFAULT_MODEL_NAME:
        raise click.ClickException(
            f"only {DEFAULT_MODEL_NAME} has bundled original data; compile {settings.model_name} with --no-original"
        )
    return digits_originals(settings.split_path)


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

    from feedback.champion import announce
    from feedback.keys import Keys

    def announcer(model_name: str, version: str) -> None:
        client = redis.Redis.from_url(redis_url(settings), socket_connect_timeout=2, socket_timeout=5)
        try:
            announce(client, Keys(settings.redis_prefix), model_name, version)
        except redis.RedisError as exc:
            click.echo(f"warning: promotion recorded but not announced ({exc}); workers pick it up on start", err=True)
        finally:
            client.close()

    return announcer


def _version_line(v: Any) -> str:
    watermark = "" if v.watermark is None else f" watermark {v.watermark}"
    return f"{v.id}  {v.kind.value:<10} {v.rows:>9} rows{watermark}  {v.created_at:%Y-%m-%d %H:%M}  {v.uri}"


# -- datasets -------------------------------------------------------------------------------------


@click.group()
def datasets() -> None:
    """Versioned training sets compiled from the current labels."""


@datasets.command("compile")
@click.option("--watermark", type=click.IntRange(min=0), help="Highest annotation revision to include (default: all).")
@click.option("--original/--no-original", default=True, show_default=True, help="Include the original training data.")
@click.option("--admin", "admin_name", help="Admin to record as the author.")
def datasets_compile(watermark: int | None, original: bool, admin_name: str | None) -> None:
    """Compile a training version; prints its id (DVC's directory hash)."""
    from feedback import datasets as ds

    settings = Settings()
    with _connection(settings) as conn, _clean_errors():
        actor = _admin(conn, admin_name, required=False)
        originals = _originals(settings)  # the validation set is frozen from the original split
        validation = ds.freeze_validation(
            conn=conn, model_name=settings.model_name, originals=originals, schema=_schema(),
            root_url=settings.datasets_root, actor=actor,
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            bar: list[Any] = []

            def progress(done: int, expected: int) -> None:
                if not bar:
                    new = click.progressbar(length=expected, label="compiling", file=sys.stderr)
                    bar.append(stack.enter_context(new))
                bar[0].update(done - bar[0].pos)

            version = ds.compile_training(
                conn=conn, model_name=settings.model_name, schema=_schema(),
                originals=originals if original else None, validation=validation, root_url=settings.datasets_root,
                watermark=watermark, actor=actor, progress=progress,
            )  # fmt: skip
    click.echo(
        f"training version {version.id}: {version.rows} rows at watermark {version.watermark}, "
        f"validation {version.validation_id}\n  per class: {json.dumps(version.per_class)}\n  {version.uri}"
    )


@datasets.command("list")
def datasets_list() -> None:
    """List training and validation versions, oldest first."""
    from feedback import dataset_store

    settings = Settings()
    with _connection(settings) as conn:
        for v in dataset_store.list_versions(conn=conn, model_name=settings.model_name):
            click.echo(_version_line(v))


@datasets.command("show")
@click.argument("version_id")
def datasets_show(version_id: str) -> None:
    """Print a version's manifest."""
    from feedback import dataset_store

    with _connection(Settings()) as conn:
        version = dataset_store.get_version(conn=conn, version_id=version_id)
    if version is None:
        raise click.ClickException(f"no dataset version {version_id}")
    click.echo(json.dumps({"id": version.id, "uri": version.uri, **version.manifest}, indent=2))


# -- validation -----------------------------------------------------------------------------------


@click.group()
def validation() -> None:
    """The frozen validation set: show it, or fix labels into a new version (admin)."""


@validation.command("show")
def validation_show() -> None:
    """The current validation version and its ancestors."""
    from feedback import dataset_store
    from feedback.dataset_store import Kind

    settings = Settings()
    with _connection(settings) as conn:
        versions = dataset_store.list_versions(conn=conn, model_name=settings.model_name, kind=Kind.VALIDATION)
    if not versions:
        raise click.ClickException("no validation version yet: `loop datasets compile` freezes it")
    for v in versions:
        click.echo(_version_line(v) + ("  (current)" if v is versions[-1] else ""))


@validation.command("fix")
@click.option("--item", "items", multiple=True, required=True, metavar="ITEM=LABEL", help="Item id and right label.")
@click.option("--reason", required=True, help="Why the labels were wrong.")
@click.option("--admin", "admin_name", required=True, help="The admin making the change.")
def validation_fix(items: tuple[str, ...], reason: str, admin_name: str) -> None:
    """Fix labels: a new validation version; every model compared on the old one is re-evaluated."""
    from feedback import dataset_store
    from feedback import datasets as ds
    from feedback.champion import reevaluate

    fixes = []
    for item in items:
        item_id, sep, label = item.rpartition("=")
        if not sep or not item_id or not label:
            raise click.BadParameter(f"{item!r} is not ITEM=LABEL", param_hint="--item")
        fixes.append(ds.LabelFix(item_id=item_id, label=label, reason=reason))
    settings = Settings()
    with _connection(settings) as conn, _clean_errors():
        actor = _admin(conn, admin_name, required=True)
        assert actor is not None
        old = dataset_store.current_validation(conn=conn, model_name=settings.model_name)
        new = ds.fix_validation(
            conn=conn, model_name=settings.model_name, fixes=fixes, schema=_schema(),
            root_url=settings.datasets_root, actor=actor,
        )  # fmt: skip
        assert old is not None
        click.echo(f"validation version {new.id} replaces {old.id}")
        for name, version, accuracy in reevaluate(conn, old=old, new=new):
            click.echo(f"  {name}:{version} re-evaluated: accuracy {accuracy:.4f}")


# -- retrain and promote --------------------------------------------------------------------------


@click.command("retrain")
@click.option("--dataset", "dataset_id", required=True, help="Training version id (`loop datasets list`).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the protocol's epochs (recorded in the run).")
@click.option("--seed", type=int, help="Override the protocol's seed (recorded in the run).")
@click.option("--margin", type=click.FloatRange(0, 1), help="Gate margin (default LOOP_PROMOTION_MARGIN).")
def retrain(dataset_id: str, epochs: int | None, seed: int | None, margin: float | None) -> None:
    """Train on a dataset version, evaluate, log to MLflow, and promote if it beats the champion."""
    from dataclasses import replace

    from feedback import dataset_store
    from feedback import retrain as loop
    from models.train import EpochMetrics, TrainConfig

    settings = Settings()
    config = TrainConfig()
    config = replace(config, epochs=epochs or config.epochs, seed=config.seed if seed is None else seed)
    with _connection(settings) as conn, _clean_errors():
        dataset = dataset_store.get_version(conn=conn, version_id=dataset_id)
        if dataset is None:
            raise click.ClickException(f"no dataset version {dataset_id} (see `loop datasets list`)")
        with click.progressbar(length=config.epochs, label="training", file=sys.stderr) as bar:

            def on_epoch(m: EpochMetrics) -> None:
                bar.update(1)

            result = loop.retrain(
                conn=conn, model_name=settings.model_name, dataset=dataset, tracking=_tracking(settings),
                config=config, margin=settings.promotion_margin if margin is None else margin,
                announcer=_announcer(settings), on_epoch=on_epoch,
            )  # fmt: skip
    p = result.promotion
    click.echo(
        f"{result.build.stored.tag}: validation accuracy {result.evaluation.accuracy:.4f}, "
        f"ECE {result.evaluation.ece:.4f}, MLflow run {result.run_id}\n{p.decision.value}: {p.reason}"
    )


@click.command("promote")
@click.argument("version")
@click.option("--reason", required=True, help="Why the gate is overridden.")
@click.option("--admin", "admin_name", required=True, help="The admin taking the decision.")
def promote(version: str, reason: str, admin_name: str) -> None:
    """Make a stored model version champion regardless of the gate (recorded, announced)."""
    from feedback.champion import promote as force

    settings = Settings()
    with _connection(settings) as conn, _clean_errors():
        actor = _admin(conn, admin_name, required=True)
        assert actor is not None
        promotion = force(
            conn=conn, model_name=settings.model_name, model_version=version, reason=reason, actor=actor,
            announcer=_announcer(settings),
        )  # fmt: skip
    click.echo(f"{promotion.model_name}:{promotion.model_version} is champion ({promotion.decision.value})")


@click.command("champion")
def champion() -> None:
    """The champion and every gate decision, oldest first."""
    from feedback import dataset_store

    settings = Settings()
    with _connection(settings) as conn:
        history = dataset_store.promotions(conn=conn, model_name=settings.model_name)
    if not history:
        click.echo(f"no decision recorded yet: services serve the newest {settings.model_name} in the store")
    for p in history:
        accuracy = "" if p.accuracy is None else f" accuracy {p.accuracy:.4f}"
        click.echo(f"{p.at:%Y-%m-%d %H:%M:%S}  {p.model_version}  {p.decision.value:<9}{accuracy}  {p.reason}")


@click.command("experiments")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder (default var/reports).")
def experiments(out: Path | None) -> None:
    """Compare runs: validation error per epoch of each (log-log PNG) and a table of runs (Markdown)."""
    from feedback.report import write_report

    settings = Settings()
    with _clean_errors():
        png, markdown = write_report(_tracking(settings), settings.model_name, out or settings.var_dir / "reports")
    click.echo(markdown.read_text())
    click.echo(f"plot: {png}")


COMMANDS = (datasets, validation, retrain, promote, champion, experiments, demo_loop)
