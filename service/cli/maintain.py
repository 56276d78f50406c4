"""`loop maintain`: the prediction log's upkeep by hand (`loop ingest` does it every
LOOP_MAINTENANCE_INTERVAL_S): daily partitions ahead, and retention."""

from __future__ import annotations

import click

from service.cli.common import clean_errors, connection
from service.settings import Settings


@click.command()
@click.option("--dry-run", is_flag=True, help="Say which partitions would go and what they keep; change nothing.")
@click.option(
    "--retention-days",
    type=click.IntRange(min=1),
    help="Days of predictions to keep (default: LOOP_RETENTION_DAYS; unset there and here: keep everything).",
)
def maintain(dry_run: bool, retention_days: int | None) -> None:
    """Make the coming days' partitions; drop whole partitions past the retention period, their
    protected items (leased, under review, judged but not compiled, validation) kept first."""
    from feedback.use_cases import maintain as upkeep

    settings = Settings()
    days = retention_days or settings.retention_days
    with clean_errors(), connection(settings) as conn:
        done = upkeep(conn, retention_days=days, dry_run=dry_run, ahead_days=settings.partitions_ahead_days)
    for name in done.created:
        click.echo(f"created {name}")
    if days is None:
        click.echo("no retention (LOOP_RETENTION_DAYS is unset): every partition is kept")
        return
    for expiring in done.expiring:
        click.echo(("would: " if dry_run else "") + expiring.describe())
    gone = sum(e.rows - e.kept for e in done.expiring)
    verb = "would drop" if dry_run else "dropped"
    click.echo(f"{verb} {gone} predictions older than {days} days; {sum(e.kept for e in done.expiring)} kept")
