"""A short locust run against the real service: no failures, and every answered prediction stored."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from feedback import review as review_store
from tests.integration.conftest import ROOT, RunningService

pytestmark = pytest.mark.integration


def test_a_short_locust_run_has_no_failures_and_stores_every_prediction(
    start_service: Callable[..., RunningService],
    start_ingest: Callable[..., subprocess.Popen[bytes]],
    database_url: str,
    tmp_path: Path,
) -> None:
    service = start_service()
    start_ingest()
    with psycopg.connect(database_url, autocommit=True) as conn:
        _, reviewer = review_store.create_user(conn=conn, name="locust-reviewer", role=review_store.Role.REVIEWER)
        _, admin = review_store.create_user(conn=conn, name="locust-admin", role=review_store.Role.ADMIN)
    out = tmp_path / "locust"
    command = [
        sys.executable, "-m", "loadtest.run_locust", "--host", service.url, "--users", "6",
        "--spawn-rate", "6", "--run-time", "6s", f"--reviewer-token={reviewer}", f"--admin-token={admin}",
        "--review-weight", "2", "--admin-weight", "1", "--out", str(out), "--store-timeout", "60",
    ]  # fmt: skip
    run = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with (out / "locust_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["/predict [1]"]["Request Count"]) > 0
    assert int(rows["/review/claim"]["Request Count"]) > 0
    assert (out / "report.html").stat().st_size > 0
    ids = (out / "ids.txt").read_text().split()
    with psycopg.connect(database_url) as conn:
        stored = {str(row[0]) for row in conn.execute("SELECT id FROM predictions WHERE source = 'model'")}
    assert len(ids) == len(set(ids))
    assert set(ids) <= stored  # every prediction a client received is stored
    # Requests cut off when the run ends were answered and stored but never read by locust:
    # at most one request (of up to 8 samples) per user.
    assert len(stored - set(ids)) <= 6 * 8
    with psycopg.connect(database_url) as conn:
        verdicts = conn.execute("SELECT count(*) FROM annotations").fetchone()
    assert verdicts is not None and verdicts[0] > 0  # reviewers reviewed
