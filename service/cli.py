"""The `loop` command line: train the default model, inspect the store, run the service."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import click

from models import store
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
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the protocol's epochs.")
@click.option("--if-missing", is_flag=True, help="Do nothing if the store already has the model.")
def train(epochs: int | None, if_missing: bool) -> None:
    """Train the default digits model and save it to the BentoML model store."""
    settings = Settings()
    if if_missing and store.exists(settings.model_ref):
        click.echo(f"{settings.model_ref} is in the model store; not training")
        return
    from models.pipeline import build_digits_model  # torch loads only when training
    from models.train import EpochMetrics, TrainConfig

    config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    with click.progressbar(length=config.epochs, label="training", file=sys.stderr) as bar:

        def on_epoch(m: EpochMetrics) -> None:
            bar.update(1)
            logger.debug("epoch %d train loss %.4f val error %s", m.epoch, m.train_loss, m.validation_error)

        result = build_digits_model(
            name=settings.model_name, split_path=settings.split_path, config=config, on_epoch=on_epoch
        )
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


@main.command()
@click.option("--train-if-missing/--no-train", default=True, help="Train the default model if absent.")
def serve(train_if_missing: bool) -> None:
    """Run the BentoML service (host, port and workers come from the settings)."""
    settings = Settings()
    if not store.exists(settings.model_ref):
        if not train_if_missing:
            raise click.ClickException(f"{settings.model_ref} is not in the model store; run `loop train`")
        click.get_current_context().invoke(train)
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    args = [
        bentoml,
        "serve",
        "service.app:Predictor",
        "--working-dir",
        str(ROOT),
        "--host",
        settings.host,
        "--port",
        str(settings.port),
    ]
    os.environ["BENTOML_CONFIG_OPTIONS"] = " ".join(
        filter(
            None, [os.environ.get("BENTOML_CONFIG_OPTIONS", ""), f"services.loop.workers={settings.workers}"]
        )
    )
    click.echo(f"serving {settings.model_ref} on http://{settings.host}:{settings.port} (OpenAPI page at /)")
    os.execv(args[0], args)
