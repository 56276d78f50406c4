"""`loop train|show|models`: train a model (the built-in data, else a compiled training version),
print what the store records, import a team's ONNX classifier, list the stored versions."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from models import store
from service.cli.common import clean_errors, connection, model_option
from service.cli.datasets import compile_version
from service.cli.retrain import retrain_version
from service.settings import Settings

logger = logging.getLogger("loop")


@click.command()
@model_option
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
        with connection(settings) as conn, clean_errors():
            dataset = compile_version(conn, settings, name)
            click.echo(f"training version {dataset.id}: {dataset.rows} rows  {json.dumps(dataset.per_class)}")
            retrain_version(conn, settings, name, dataset, epochs=epochs)
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


@click.command()
@click.argument("tag", required=False)
def show(tag: str | None) -> None:
    """Print what the store records about a model (default: the configured one)."""
    ref = tag or Settings().model_ref
    try:
        stored = store.get(ref)
    except store.ModelNotFound as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"tag": stored.tag, **stored.card.to_metadata()}, indent=2))


@click.group()
def models() -> None:
    """The models in the BentoML store: import a team's ONNX classifier, list them."""


@models.command("import")
@click.argument("name")
@click.option(
    "--onnx",
    "onnx_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The exported classifier (dynamic batch axis).",
)
@click.option(
    "--spec",
    "spec_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Its model spec, YAML or TOML (see models/spec.py).",
)
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


@models.command("export-triton")
@click.argument("name")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--version", "version", help="The stored version (default: the champion, else the newest).")
@click.option(
    "--number",
    type=click.IntRange(min=1),
    help="Its version in Triton (default: its number in the store, the oldest 1, as LOOP_INFERENCE=remote names it).",
)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
def models_export_triton(name: str, root: Path, version: str | None, number: int | None, max_batch_size: int) -> None:
    """Write a stored version of NAME into the Triton model repository ROOT (config.pbtxt for the
    ONNX Runtime backend with dynamic batching, <number>/model.onnx, labels.txt)."""
    from models.triton import export_repository
    from service.cli.common import clean_errors

    with clean_errors():
        stored = store.get(f"{name}:{version or _champion_or_latest(name)}")
        number = number or store.version_number(stored)
        try:
            folder = export_repository(stored, root, number=number, max_batch_size=max_batch_size)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"exported {stored.tag} as {folder} (version {number})")


def _champion_or_latest(name: str) -> str:
    """The champion's version when a database says so, else the newest stored version."""
    from feedback.champion import champion
    from service.cli.common import connection
    from service.settings import Settings

    try:
        with connection(Settings()) as conn:
            found = champion(conn=conn, model_name=name)
    except click.ClickException:  # no database reachable: the store alone decides
        found = None
    return "latest" if found is None else found.model_version
