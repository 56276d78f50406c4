"""The prediction log's upkeep as a team runs it: `loop ingest` makes the coming days' partitions
as it starts, and `loop maintain` says (dry) and applies retention."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from feedback.predictions import partitions, store
from tests.data.test_partitions import rows_on
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration


def loop_maintain(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "maintain", *arguments]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_ingest_makes_partitions_ahead_and_maintain_applies_retention(
    start_ingest: Callable[..., subprocess.Popen[bytes]], service_env: dict[str, str], database_url: str
) -> None:
    today = datetime.now(UTC).date()
    wanted = {f"predictions_p{today + timedelta(days=d):%Y%m%d}" for d in range(-1, 8)}
    start_ingest()
    with psycopg.connect(database_url, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while not wanted <= {p.name for p in partitions.partitions(conn)}:
            assert time.monotonic() < deadline, "the ingest worker made no partitions ahead"
            time.sleep(0.2)
        old = [today - timedelta(days=d) for d in (45, 44)]
        store.insert_rows(conn=conn, rows=rows_on(old, per_day=3))

    dry = loop_maintain(service_env, "--retention-days", "30", "--dry-run").stdout
    assert f"would: predictions_p{old[0]:%Y%m%d} (from {old[0]}): 3 rows, 0 protected -> drop" in dry, dry
    assert "would drop 6 predictions older than 30 days; 0 kept" in dry, dry
    assert "no retention" in loop_maintain(service_env).stdout  # LOOP_RETENTION_DAYS unset
    done = loop_maintain({**service_env, "LOOP_RETENTION_DAYS": "30"}).stdout
    assert "dropped 6 predictions older than 30 days" in done, done
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
        assert not {f"predictions_p{d:%Y%m%d}" for d in old} & {p.name for p in partitions.partitions(conn)}
