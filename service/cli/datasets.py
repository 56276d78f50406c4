"""`loop datasets` and `loop validation`: original data imported once, training versions compiled
from the current labels, and the frozen validation set, fixed only by an admin."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.cli.common import admin, clean_errors, connection, model_option, progress
from service.settings import Settings

if TYPE_CHECKING:
    import psycopg

    from feedback.datasets import LabelSchema, Originals
    from feedback.review import User


def _schema(model_name: str) -> LabelSchema:
    from feedback.datasets import LabelSchema
    from models.builtin import spec_of

    return LabelSchema.of(spec_of(model_name))


def _originals(conn: psycopg.Connection, settings: Settings, model_name: str) -> Originals | None:
    from feedback.datasets import originals_for

    return originals_for(conn, model_name, settings.split_path)


def _version_line(v: Any) -> str:
    watermark = "" if v.watermark is None else f" watermark {v.watermark}"
    return f"{v.id}  {v.kind.value:<10} {v.rows:>9} rows{watermark}  {v.created_at:%Y-%m-%d %H:%M}  {v.uri}"


def compile_version(
    conn: psycopg.Connection,
    settings: Settings,
    model_name: str,
    *,
    watermark: int | None = None,
    original: bool = True,
    actor: User | None = None,
    weighting: bool | None = None,
) -> Any:
    """Freeze the validation version if need be (from the original split, else from verdicts) and
    compile a training version, with a progress bar; `weighting` defaults to the setting."""
    from feedback.use_cases import compile_with_validation

    with contextlib.ExitStack() as stack:
        return compile_with_validation(
            conn=conn,
            model_name=model_name,
            schema=_schema(model_name),
            originals=lambda: _originals(conn, settings, model_name),
            include_original=original,
            root_url=settings.datasets_root,
            watermark=watermark,
            actor=actor,
            progress=progress(stack, "compiling"),
            weighting=settings.weighting if weighting is None else replace(settings.weighting, enabled=weighting),
        )


# -- datasets -------------------------------------------------------------------------------------


@click.group()
def datasets() -> None:
    """Versioned training sets compiled from the current labels."""


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
            conn=conn,
            model_name=name,
            schema=_schema(name),
            source=source,
            root_url=settings.datasets_root,
            seed=seed,
            validation_fraction=validation_fraction,
            actor=admin(conn, admin_name, required=False),
            progress=progress(stack, "reading"),
        )
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
@click.option(
    "--weighted/--unweighted",
    "weighting",
    default=None,
    help="Settle disputes by labels weighted by reviewer reliability (default: LOOP_LABELS_WEIGHTING).",
)
@click.option("--admin", "admin_name", help="Admin to record as the author.")
def datasets_compile(
    model_name: str | None, watermark: int | None, original: bool, weighting: bool | None, admin_name: str | None
) -> None:
    """Compile a training version; prints its id (DVC's directory hash)."""
    settings = Settings()
    name = model_name or settings.model_name
    with connection(settings) as conn, clean_errors():
        actor = admin(conn, admin_name, required=False)
        version = compile_version(
            conn, settings, name, watermark=watermark, original=original, actor=actor, weighting=weighting
        )
    click.echo(
        f"training version {version.id}: {version.rows} rows at watermark {version.watermark}, "
        f"validation {version.validation_id}\n  per class: {json.dumps(version.per_class)}\n  {version.uri}"
    )


@datasets.command("list")
@model_option
def datasets_list(model_name: str | None) -> None:
    """List original, training and validation versions, oldest first."""
    from feedback.datasets import store as dataset_store

    settings = Settings()
    with connection(settings) as conn:
        for v in dataset_store.list_versions(conn=conn, model_name=model_name or settings.model_name):
            click.echo(_version_line(v))


def _version(version_id: str) -> Any:
    from feedback.datasets import store as dataset_store

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
    from feedback.datasets import Kind
    from feedback.datasets import store as dataset_store

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
        actor = admin(conn, admin_name, required=True)
        assert actor is not None
        fixed = fix_and_reevaluate(
            conn=conn, model_name=name, fixes=fixes, schema=_schema(name), root_url=settings.datasets_root, actor=actor
        )
        click.echo(f"validation version {fixed.new.id} replaces {fixed.old.id}")
        for name, version, accuracy in fixed.reevaluated:
            click.echo(f"  {name}:{version} re-evaluated: accuracy {accuracy:.4f}")


@validation.command("freeze-live")
@model_option
@click.option(
    "--min-judged",
    type=click.IntRange(min=1),
    help="Judged live items needed (default: LOOP_LIVE_VALIDATION_MIN_JUDGED).",
)
def validation_freeze_live(model_name: str | None, min_judged: int | None) -> None:
    """Freeze the judged items of the live sample (a random share of traffic, LOOP_LIVE_VALIDATION_SHARE)
    of the last LOOP_LIVE_VALIDATION_DAYS as a new live validation version (`loop ingest` does it on
    its schedule); none of them is in a training version."""
    from feedback.datasets.live import freeze_live_validation

    settings = Settings()
    name = model_name or settings.model_name
    with clean_errors(), connection(settings) as conn:
        frozen = freeze_live_validation(
            conn=conn,
            model_name=name,
            schema=_schema(name),
            root_url=settings.datasets_root,
            days=settings.live_validation_days,
            min_judged=min_judged or settings.live_validation_min_judged,
        )
    if frozen is None:
        raise click.ClickException(f"no new live validation version of {name}: too few judged live items, or none new")
    click.echo(_version_line(frozen))
