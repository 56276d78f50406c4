"""Live model health through the service: `loop health` folds the log and reports (table and HTML),
`GET /admin/health` answers the same windows to an admin only, and the gauges on `/metrics` carry
the values the API returns."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from click.testing import CliRunner

from feedback import review as rs
from models.pipeline import BuildResult
from service.cli import main
from tests.data.test_health import HeldOut, held_out, send, undrifted  # noqa: F401 (a fixture)
from tests.integration.conftest import RunningService

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def gauge(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_health_report_api_and_gauges_agree(
    start_service: Callable[..., RunningService],
    trained_model: BuildResult,
    database_url: str,
    service_env: dict[str, str],
    held_out: HeldOut,  # noqa: F811
    tmp_path: Path,
) -> None:
    stored = trained_model.stored
    rng = np.random.default_rng(11)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    calm, drifted = now - timedelta(hours=3), now - timedelta(hours=2)
    x, y = undrifted(rng, held_out, 300)
    with psycopg.connect(database_url, autocommit=True) as conn:
        send(conn, trained_model, {calm: undrifted(rng, held_out, 300), drifted: (np.clip(x + 3, 0, 16), y)})
        _, admin = rs.create_user(conn=conn, name="root", role=rs.Role.ADMIN)
        _, reviewer = rs.create_user(conn=conn, name="ann", role=rs.Role.REVIEWER)

    out = tmp_path / "health.html"
    env = {**service_env, "LOOP_MODEL_NAME": stored.name}
    done = CliRunner().invoke(main, ["health", "--hours", "6", "--html", str(out)], env=env)
    assert done.exit_code == 0, done.output
    rows = [line for line in done.output.splitlines() if stored.version in line and re.search(r"\d{4}-\d\d-\d\d", line)]
    assert len(rows) == 2 and " 300 " in rows[0] and rows[0].rstrip().endswith("-") and "inputs" in rows[1], done.output
    span = f"{calm.isoformat()}/{(calm + timedelta(hours=1)).isoformat()}"
    picked = CliRunner().invoke(main, ["health", "--set-reference", span, "--no-update"], env=env)
    assert picked.exit_code == 0 and f"reference of {stored.name}: {span} for {stored.version}" in picked.output
    back = CliRunner().invoke(main, ["health", "--set-reference", "validation", "--no-update"], env=env)
    assert back.exit_code == 0 and "its validation version" in back.output, back.output
    wrong = CliRunner().invoke(main, ["health", "--set-reference", "last week"], env=env)
    assert wrong.exit_code == 2 and "is not SINCE/UNTIL" in wrong.output
    page = out.read_text()
    assert "<img alt='health over time' src='data:image/png;base64," in page and stored.version in page

    service = start_service(LOOP_HEALTH_INTERVAL_S="1")
    with httpx.Client(base_url=service.url, timeout=30) as http:
        refused = http.get("/admin/health", headers={"Authorization": f"Bearer {reviewer}"})
        assert refused.status_code == 403
        answer = http.get("/admin/health", params={"hours": 6}, headers={"Authorization": f"Bearer {admin}"})
        assert answer.status_code == 200, answer.text
        found = answer.json()
        assert [w["count"] for w in found["windows"]] == [300, 300]
        assert found["references"][stored.version]["samples"] > 0
        first, last = found["windows"]
        assert not first["alarms"] and "inputs" in last["alarms"]
        assert first["estimated_accuracy"]["low"] <= first["estimated_accuracy"]["value"] <= 1
        labels = {"model_name": stored.name, "model_version": stored.version, "window": "1h"}
        daily = {**labels, "window": "24h"}
        deadline = time.monotonic() + 30
        while gauge(metrics := http.get("/metrics").text, "loop_drift_alarm", **daily, kind="inputs") is None:
            assert time.monotonic() < deadline, "no daily health gauges on /metrics"  # set after the hourly ones
            time.sleep(0.5)
        value = gauge(metrics, "loop_estimated_accuracy", **labels)
    assert value == pytest.approx(last["estimated_accuracy"]["value"], abs=1e-9)
    shifts = {s["kind"]: s for s in last["shifts"]}
    for kind in ("labels", "confidence", "inputs"):
        assert gauge(metrics, "loop_drift_score", **labels, kind=kind) == pytest.approx(shifts[kind]["psi"], abs=1e-9)
        assert gauge(metrics, "loop_drift_alarm", **labels, kind=kind) == float(shifts[kind]["alarm"])
