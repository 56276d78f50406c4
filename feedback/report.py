"""The comparison report across experiments: validation error per epoch overlaid, and a table of runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from feedback.tracking import Tracking
from models import plots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRow:
    run_id: str
    started: datetime
    status: str
    model_version: str
    dataset_id: str
    validation_id: str
    accuracy: float | None
    decision: str
    curve: list[tuple[int, float]]


def runs(tracking: Tracking, model_name: str) -> list[RunRow]:
    """Every run of the model's experiment, oldest first, with its validation-error curve."""
    client = tracking.client()
    experiment = client.get_experiment_by_name(model_name)
    if experiment is None:
        return []
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    rows = []
    for run in found:
        history = client.get_metric_history(run.info.run_id, "validation_error")
        rows.append(
            RunRow(
                run_id=run.info.run_id,
                started=datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC),
                status=run.info.status,
                model_version=run.data.tags.get("model_version", ""),
                dataset_id=run.data.params.get("dataset_id", ""),
                validation_id=run.data.params.get("validation_id", ""),
                accuracy=run.data.metrics.get("accuracy"),
                decision=run.data.tags.get("decision", ""),
                curve=sorted((int(m.step), float(m.value)) for m in history),
            )
        )
    return rows


def write_report(tracking: Tracking, model_name: str, out_dir: Path) -> tuple[Path, Path]:
    """Write `validation_error.png` and `runs.md` to `out_dir`; returns their paths."""
    found = runs(tracking, model_name)
    if not found:
        raise LookupError(f"no runs of {model_name} in {tracking.tracking_uri}")
    curves = {f"{r.model_version or r.run_id[:8]} ({r.dataset_id[:8]})": r.curve for r in found if r.curve}
    png = plots.save_png(
        plots.validation_error_overlay(curves, title=f"{model_name}: validation error per epoch"),
        out_dir / "validation_error.png",
    )
    lines = [
        f"# Experiments of {model_name}",
        "",
        f"{len(found)} runs from {tracking.tracking_uri}. Plot: `validation_error.png`.",
        "",
        "| started (UTC) | run | model version | dataset | validation | accuracy | decision | status |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    for r in found:
        accuracy = "" if r.accuracy is None else f"{r.accuracy:.4f}"
        lines.append(
            f"| {r.started:%Y-%m-%d %H:%M:%S} | `{r.run_id[:12]}` | {r.model_version} | `{r.dataset_id[:12]}` "
            f"| `{r.validation_id[:12]}` | {accuracy} | {r.decision} | {r.status} |"
        )
    markdown = out_dir / "runs.md"
    markdown.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s and %s", png, markdown)
    return png, markdown
