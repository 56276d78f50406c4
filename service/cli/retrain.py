"""`loop retrain|promote|champion|experiments`: train a candidate on a dataset version and gate it
against the champion, override the gate (admin), read the decisions, compare the runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.cli.common import admin, announcing, clean_errors, connection, model_option, redis_url
from service.settings import Settings

if TYPE_CHECKING:
    import psycopg

    from feedback.tracking import Tracking


def _tracking(settings: Settings) -> Tracking:
    from feedback.tracking import Tracking

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return Tracking(tracking_uri=settings.tracking_uri, artifact_uri=settings.artifact_uri)


def _announcer(settings: Settings) -> Any:
    from feedback.keys import Keys
    from feedback.use_cases import announcer as on_redis

    return announcing(on_redis(redis_url(settings), Keys(settings.redis_prefix)), "promotion")


def retrain_version(
    conn: psycopg.Connection,
    settings: Settings,
    model_name: str,
    dataset: Any,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    margin: float | None = None,
    trainer: str | None = None,
) -> Any:
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
            conn=conn,
            model_name=model_name,
            dataset=dataset,
            tracking=_tracking(settings),
            config=config,
            margin=settings.promotion_margin if margin is None else margin,
            announcer=_announcer(settings),
            on_epoch=on_epoch,
            trainer=trainer,
        )
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
@click.option(
    "--trainer",
    help="Train with this package.module:function instead of the spec's, and store it in the "
    "candidate's spec (models.trainers:fine_tune: the model's own imported graph, fine-tuned).",
)
def retrain(  # noqa: PLR0917  (each option is an argument, as click passes them)
    model_name: str | None,
    dataset_id: str,
    epochs: int | None,
    seed: int | None,
    margin: float | None,
    trainer: str | None,
) -> None:
    """Train on a dataset version with the model's trainer, evaluate, log to MLflow, and promote
    if it beats the champion."""
    from feedback.datasets import store as dataset_store

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
        actor = admin(conn, admin_name, required=True)
        assert actor is not None
        promotion = force(
            conn=conn,
            model_name=model_name or settings.model_name,
            model_version=version,
            reason=reason,
            actor=actor,
            announcer=_announcer(settings),
        )
    click.echo(f"{promotion.model_name}:{promotion.model_version} is champion ({promotion.decision.value})")


@click.command("champion")
@model_option
def champion(model_name: str | None) -> None:
    """The champion and every gate decision, oldest first."""
    from feedback.champion import promotions

    settings = Settings()
    name = model_name or settings.model_name
    with connection(settings) as conn:
        history = promotions(conn=conn, model_name=name)
    if not history:
        click.echo(f"no decision recorded yet: services serve the newest {name} in the store")
    for p in history:
        accuracy = "" if p.accuracy is None else f" accuracy {p.accuracy:.4f}"
        margin = "" if p.margin is None else f" margin {p.margin:.4f}"
        live = p.live_evidence
        judged = (
            "" if live is None else f" live: {live['shadow_correct']}/{live['judged']} vs {live['champion_correct']}"
        )
        line = f"{p.at:%Y-%m-%d %H:%M:%S}  {p.model_version}  {p.decision.value:<9}{accuracy}{margin}{judged}"
        click.echo(f"{line}  {p.reason}")


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
