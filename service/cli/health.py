"""`loop health`: a model's live health as a table, and as a report a person can send (`--html`)."""

from __future__ import annotations

import base64
import html
import io
from datetime import UTC, datetime
from pathlib import Path

import click

from service.cli.common import clean_errors, connection
from service.settings import Settings


@click.command()
@click.option("--model", "model_name", help="The model (default: LOOP_MODEL_NAME).")
@click.option("--window-hours", type=click.IntRange(1, 24 * 7), default=1, show_default=True, help="Window size.")
@click.option("--hours", type=click.IntRange(min=1), default=48, show_default=True, help="How far back.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), help="Write an HTML report.")
@click.option("--update/--no-update", default=True, help="Fold new predictions into the windows first.")
@click.option(
    "--set-reference",
    metavar="SINCE/UNTIL|validation",
    help="Compare the windows from now on with the model's own predictions of SINCE/UNTIL (ISO times, UTC "
    "unless they say), or with its validation version again.",
)
def health(
    *,
    model_name: str | None,
    window_hours: int,
    hours: int,
    html_path: Path | None,
    update: bool,
    set_reference: str | None,
) -> None:
    """Volume, drift against each version's reference, and estimated beside judged accuracy, per window."""
    from feedback.health import advance_all, choose_reference
    from models import store
    from service.routes.health import read

    settings = Settings()
    name = model_name or settings.model_name
    window = None if set_reference is None else _window(set_reference)
    with clean_errors(), connection(settings) as conn:
        classes = store.get(f"{name}:latest").card.signature.class_names
        if set_reference is not None:
            since, until = window or (None, None)
            chosen = choose_reference(conn, model_name=name, since=since, until=until)
            click.echo(
                f"reference of {name}: "
                + (f"{set_reference} for {', '.join(chosen)}" if chosen else "its validation version")
            )
        if update:
            advance_all(conn, config=settings.health_config)
        found = read(conn, name, classes, window_hours=window_hours, hours=hours, alpha=settings.health_alpha)
    lines = table(found)
    for line in lines:
        click.echo(line)
    if html_path is not None:
        html_path.write_text(report_html(found, lines))
        click.echo(f"wrote {html_path}")


def _window(text: str) -> tuple[datetime, datetime] | None:
    """SINCE/UNTIL as UTC times, or None for 'validation'."""
    if text == "validation":
        return None
    try:
        since, until = (datetime.fromisoformat(part) for part in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not SINCE/UNTIL in ISO times, nor 'validation'") from None
    return since if since.tzinfo else since.replace(tzinfo=UTC), until if until.tzinfo else until.replace(tzinfo=UTC)


def table(found: object) -> list[str]:
    from feedback.health import Report

    assert isinstance(found, Report)
    if not found.windows:
        return [f"{found.model_name}: no predictions in the health windows yet (`loop ingest` folds them in)"]
    lines = [f"{found.model_name}, windows of {found.window_s // 3600} h, drift tests at level {found.alpha}:"]
    for version, ref in found.references.items():
        of = f"{ref['samples']} samples of {ref['validation_id']}"
        live = ""
        if ref.get("live_accuracy") is not None:
            live = f"; on the live validation version {ref['live_validation_id']} ({ref['live_samples']} samples): "
            live += f"{ref['live_accuracy']:.3f}"
        accuracy = "" if ref["accuracy"] is None else f", accuracy {ref['accuracy']:.3f}"
        lines.append(f"  reference of {version}: {of}{accuracy}{live}")
    heading = ("window (UTC)", "version", "n", "PSI labels/conf/inputs", "estimated", "judged", "alarms")
    lines.append(_row(*heading))
    for w in found.windows:
        psi = {s.kind: s.psi for s in w.shifts}
        drift = "/".join(f"{psi[k]:.3f}" if k in psi else "-" for k in ("labels", "confidence", "inputs"))
        judged = _interval(w.judged) + ("" if w.judged is None else f" n={w.judged_count}")
        flags = ", ".join(w.alarms + (["estimate and judged disagree"] if w.disagree else [])) or "-"
        cells = (f"{w.start:%Y-%m-%d %H:%M}", w.model_version, str(w.count), drift, _interval(w.estimated))
        lines.append(_row(*cells, judged, flags))
    return lines


def _interval(found: object) -> str:
    from models.health import Estimate

    return f"{found.value:.3f} [{found.low:.3f}, {found.high:.3f}]" if isinstance(found, Estimate) else "-"


WIDTHS = (16, 18, -7, 23, 21, 28, 0)  # negative: right-aligned


def _row(*cells: str) -> str:
    return "  " + " ".join(f"{c:>{-w}}" if w < 0 else f"{c:<{w}}" for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


def report_html(found: object, lines: list[str]) -> str:
    """A self-contained page: the plot (PNG inline) and the table."""
    from feedback.health import Report
    from models.plots import HealthPoint, health_over_time

    assert isinstance(found, Report)
    series: dict[str, list[HealthPoint]] = {}
    for w in found.windows:
        est = None if w.estimated is None else (w.estimated.value, w.estimated.low, w.estimated.high)
        judged = None if w.judged is None else (w.judged.value, w.judged.low, w.judged.high)
        point = HealthPoint(w.start, w.count, {s.kind: s.psi for s in w.shifts}, w.alarms, est, judged)
        series.setdefault(w.model_version, []).append(point)
    buffer = io.BytesIO()
    title = f"{found.model_name}: health per {found.window_s // 3600} h window"
    health_over_time(series, title=title).savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    image = base64.b64encode(buffer.getvalue()).decode()
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><img alt='health over time' src='data:image/png;base64,{image}'>"
        f"<pre>{html.escape(chr(10).join(lines))}</pre>"
    )
