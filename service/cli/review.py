"""`loop review export|import`: the review queue's items out to Label Studio, and its annotations
back as verdicts; `loop review guidelines set|show`: a model's guidelines for reviewers; `loop review
suspects`: likely label errors, ranked and offered to reviewers."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from service.cli.common import admin, clean_errors, connection
from service.settings import Settings

FORMATS = click.Choice(["label-studio"])


@click.group()
def review() -> None:
    """Items to and verdicts from another review tool (LOOP_DATABASE_URL, else the embedded database)."""


def _config(model: str, label_config: Path | None) -> Any:
    from feedback.review import label_studio as ls
    from models import store

    if label_config is not None:
        return ls.parse_config(label_config.read_text())
    stored = store.list_models(model)
    if not stored:
        raise click.ClickException(f"no model {model!r} is stored (see `loop models list`)")
    return ls.LabelConfig.default(stored[-1].card.signature.class_names)


@review.command("export")
@click.option("--format", "kind", type=FORMATS, required=True, help="The file's format.")
@click.option("--model", "model_name", help="Model name (default: LOOP_MODEL_NAME).")
@click.option("--status", type=click.Choice(["unreviewed", "reviewed", "disputed", "discarded"]))
@click.option("--label", help="Items the model gave this label.")
@click.option("--min-confidence", type=float)
@click.option("--max-confidence", type=float)
@click.option("--since", type=click.DateTime(), help="Items predicted at or after this time (UTC).")
@click.option("--until", type=click.DateTime(), help="Items predicted before this time (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--label-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The project's labelling config (XML), whose names the predictions use; default: `label` on `image`.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def review_export(
    *,
    kind: str,
    model_name: str | None,
    status: str | None,
    label: str | None,
    min_confidence: float | None,
    max_confidence: float | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    label_config: Path | None,
    output: Path,
) -> None:
    """Write Label Studio tasks for the items a filter selects, each with its image and our stored
    prediction (score = confidence, model version), for Label Studio's import."""
    from datetime import UTC

    from feedback.review import ItemFilter
    from feedback.review import label_studio as ls
    from feedback.review.moderation import Status

    settings = Settings()
    model = model_name or settings.model_name
    filters = ItemFilter(
        model_name=model,
        status=None if status is None else Status(status),
        label=label,
        min_confidence=min_confidence,
        max_confidence=max_confidence,
        created_from=None if since is None else since.replace(tzinfo=UTC),
        created_to=None if until is None else until.replace(tzinfo=UTC),
    )
    with clean_errors(), connection(settings) as conn:
        tasks = ls.export_tasks(conn, filters, _config(model, label_config), limit=limit)
    output.write_text(json.dumps(tasks))
    click.echo(f"wrote {len(tasks)} {kind} tasks of {model} to {output}", err=True)


@review.command("import")
@click.option("--format", "kind", type=FORMATS, required=True, help="The file's format.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_name", help="The model tasks without our item id were predicted by.")
@click.option("--admin", "admin_name", required=True, help="The admin recording the verdicts (audited).")
def review_import(kind: str, file: Path, model_name: str | None, admin_name: str) -> None:
    """Record the annotations of a Label Studio export (JSON) as verdicts of `label-studio.<user id>`;
    importing the same export again records nothing new."""
    from feedback.errors import Invalid, NotFound
    from feedback.review import label_studio as ls
    from models import store

    try:
        tasks = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"{file} is not JSON: {exc}") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise click.ClickException(f"{file} is not a Label Studio JSON export (a list of tasks)")
    classes: dict[str, tuple[str, ...] | None] = {}

    def labels_of(name: str) -> tuple[str, ...] | None:
        if name not in classes:
            stored = store.list_models(name)
            classes[name] = tuple(stored[-1].card.signature.class_names) if stored else None
        return classes[name]

    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    with clean_errors(), connection(Settings()) as conn:
        actor = admin(conn, admin_name, required=True)
        assert actor is not None
        for task in tasks:
            for annotation in task.get("annotations") or []:
                try:  # each annotation is its own transaction: one that cannot be recorded is reported
                    read = ls.LabelStudioAnnotation.read(annotation, task, None)
                    outcomes[ls.record(conn, read, actor=actor, model=model_name, labels_of=labels_of).value] += 1
                except (Invalid, NotFound) as exc:
                    problems.append(str(exc).strip("'\""))
    summary = ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())) or "no annotations"
    click.echo(f"{kind} {file}: {summary}", err=True)
    if problems:
        for problem in problems[:20]:
            click.echo(f"  not recorded: {problem}", err=True)
        raise click.ClickException(f"{len(problems)} annotations not recorded (the others are)")


@review.group("guidelines")
def guidelines() -> None:
    """A model's guidelines for reviewers: Markdown, versioned; each reviewer reads a new version once
    before their next claim."""


@guidelines.command("set")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--admin", "admin_name", required=True, help="The admin publishing them.")
def guidelines_set(name: str, file: Path, admin_name: str) -> None:
    """Publish FILE (Markdown) as the next version of NAME's guidelines."""
    from feedback.review import guidelines as gl

    settings = Settings()
    with clean_errors(), connection(settings) as conn:
        actor = admin(conn, admin_name, required=True)
        assert actor is not None
        published = gl.publish(conn=conn, admin=actor, model_name=name, markdown=file.read_text())
    click.echo(f"{name}: guidelines version {published.version} published ({len(published.markdown)} characters)")


@guidelines.command("show")
@click.argument("name")
@click.option("--all", "every", is_flag=True, help="Every version, oldest first.")
def guidelines_show(name: str, every: bool) -> None:
    """NAME's current guidelines (or every version)."""
    from feedback.review import guidelines as gl

    settings = Settings()
    with clean_errors(), connection(settings) as conn:
        found = gl.history(conn=conn, model_name=name)
    if not found:
        raise click.ClickException(
            f"{name} has no guidelines yet: `loop review guidelines set {name} FILE --admin NAME`"
        )
    for g in found if every else found[-1:]:
        click.echo(f"# version {g.version}, by {g.created_by or '-'} at {g.created_at:%Y-%m-%d %H:%M}\n{g.markdown}")


@review.command("suspects")
@click.argument("name")
@click.option("--version", "version_id", help="A training or original version (default: the newest training one).")
@click.option("--folds", type=click.IntRange(min=2, max=20), default=5, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs of each fold's training (default: the protocol's).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="Rows to print.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Every suspect to this file.")
@click.option("--admin", "admin_name", help="Admin to record as the author.")
def review_suspects(
    name: str,
    *,
    version_id: str | None,
    folds: int,
    epochs: int | None,
    top: int,
    csv_path: Path | None,
    admin_name: str | None,
) -> None:
    """Rank the rows of NAME's version whose label is probably wrong (confident learning on
    out-of-sample probabilities: the model's trainer on the other folds), keep the ranking, and
    offer its logged predictions to reviewers (review order `suspect`)."""
    import contextlib
    import csv
    import dataclasses

    from feedback import suspects
    from feedback.datasets import store as dataset_store
    from models.train import TrainConfig
    from service.cli.common import progress

    settings = Settings()
    config = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    with clean_errors(), connection(settings) as conn, contextlib.ExitStack() as stack:
        actor = admin(conn, admin_name, required=False)
        if version_id is not None:
            version = dataset_store.get_version(conn=conn, version_id=version_id)
        else:
            compiled = dataset_store.list_versions(conn=conn, model_name=name, kind=dataset_store.Kind.TRAINING)
            version = compiled[-1] if compiled else None
        if version is None:
            raise click.ClickException(
                f"no version {version_id} (`loop datasets list`)"
                if version_id
                else f"{name} has no training version yet (`loop datasets compile --model {name}`)"
            )
        on_fold = progress(stack, f"training {folds} folds")
        ranking = suspects.find(
            conn=conn, model_name=name, dataset=version, config=config, folds=folds, actor=actor, on_fold=on_fold
        )
    click.echo(
        f"{name}: {len(ranking.suspects)} of {ranking.rows} rows of {ranking.dataset_id} are likely label errors; "
        f"{ranking.reviewable} are logged predictions, offered by the review order `suspect`"
    )
    for s in ranking.suspects[:top]:
        click.echo(f"{s.rank:>5}  {s.item_id:<40} {s.label:>12} -> {s.suggested:<12} p(label) {s.quality:.3f}")
    if csv_path is not None:
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(suspects.SuspectRow)])
            writer.writeheader()
            writer.writerows(dataclasses.asdict(s) for s in ranking.suspects)
        click.echo(f"every suspect: {csv_path}")
