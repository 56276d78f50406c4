"""Faults under load (`loadtest.faults`): locust's predicting clients and reviewers at once, and in
the middle of it a service worker or the ingest worker killed with -9, or Postgres or Redis
restarted, while a shadow sees every request. Nothing answered may be lost or doubled, no verdict
answered 200 may be missing, no shadow prediction may be of a prediction not stored, and the
service must answer again, and store again, without a hand."""

from __future__ import annotations

import pytest

from loadtest import faults

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fault", faults.FAULTS)
def test_nothing_answered_is_lost_and_the_service_recovers_by_itself(fault: str, model_env: dict[str, str]) -> None:
    figures = faults.run(fault, seconds=12, users=8, env=model_env)
    assert figures.answered > 500 and figures.verdicts > 20, figures  # there was load, of both kinds
    assert figures.lost == 0, figures
    assert figures.doubled == 0, figures
    assert figures.verdicts_lost == 0, figures
    assert figures.recovered_s < 60, figures
    # A shadow saw every request: what it predicted is stored, never for a prediction not stored.
    assert figures.shadowed > 0 and figures.shadow_orphans == 0, figures
    if fault != "worker":  # only a dead service worker may cut off answers: the others are off the path
        assert figures.failed_predictions == 0, figures
