"""`loop demo-shadow` end to end: the frozen-set gate alone gets both candidates wrong on drifted
traffic; the shadows, judged blind by simulated reviewers over HTTP, get both right."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from experiments.demo_loop import Servers
from experiments.demo_shadow import ShadowDemoConfig, caught, run_shadow_demo, table, write_report
from harness import drop_database
from models.pipeline import BuildResult
from tests.conftest import POSTGRES, REDIS

pytestmark = pytest.mark.integration


def test_the_shadow_catches_what_the_frozen_set_gate_gets_wrong(tmp_path: Path, trained_model: BuildResult) -> None:
    lines: list[str] = []
    config = ShadowDemoConfig(max_judged=60)
    servers = Servers(postgres=f"{POSTGRES}/postgres", redis=REDIS)
    versions, database_url = run_shadow_demo(config, servers, tmp_path, keep=True, echo=lines.append)
    try:
        champion, a, b = versions
        # A is better on the frozen set and worse on the drifted traffic; B the other way round.
        assert a.frozen_accuracy > champion.frozen_accuracy > b.frozen_accuracy, lines
        assert a.traffic_accuracy < champion.traffic_accuracy < b.traffic_accuracy, lines
        assert (a.gate_alone, b.gate_alone) == ("promoted", "rejected")
        assert (a.decision, b.decision) == ("rejected", "promoted")
        assert a.settled_at is not None and b.settled_at is not None
        assert all(v.settled_at is not None and v.settled_at <= config.max_judged for v in (a, b))
        assert all(
            line.endswith(f"after {v.looks[-1].judged} judged items")
            for line, v in zip(caught(versions), (a, b), strict=True)
        )
        assert all("(right) after" in line and "(wrong);" in line for line in caught(versions))
        with psycopg.connect(database_url) as conn:
            recorded = conn.execute(
                "SELECT model_version, decision, live_evidence FROM promotions WHERE live_evidence IS NOT NULL"
                " ORDER BY id"
            ).fetchall()
            reviewed = conn.execute("SELECT count(*) FROM review_state WHERE status = 'reviewed'").fetchone()
        # Each decision is stored with the figures the demo read last; every judged item was judged.
        assert [(r[0], r[1]) for r in recorded] == [(a.version, "rejected"), (b.version, "promoted")]
        for (_, _, figures), v in zip(recorded, (a, b), strict=True):
            last = v.looks[-1]
            assert (figures["judged"], figures["only_champion_right"], figures["only_shadow_right"]) == (
                last.judged, last.only_champion_right, last.only_shadow_right)  # fmt: skip
        assert reviewed is not None and reviewed[0] == a.looks[-1].judged + b.looks[-1].judged
        csv_path, png = write_report(versions, config, tmp_path)
        assert len(csv_path.read_text().splitlines()) == 1 + len(a.looks) + len(b.looks)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(table(versions)) == 2 + 3
    finally:
        drop_database(f"{POSTGRES}/postgres", str(psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]))
