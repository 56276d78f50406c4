"""A short `loop demo-loop`: a skewed first model, traffic and reviews over HTTP, two rounds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from experiments.demo_loop import DemoConfig, Servers, run_demo
from feedback.datasets import read_version
from feedback.datasets import store as dataset_store
from feedback.review import Strategy
from models import digits
from models.pipeline import BuildResult
from tests.conftest import POSTGRES, REDIS

pytestmark = pytest.mark.integration


def test_a_short_demo_improves_the_model_from_reviewed_traffic_only(tmp_path: Path, trained_model: BuildResult) -> None:
    config = DemoConfig(rounds=2, traffic_rows=300, labels_per_round=45, epochs=15, overlap_share=0.3)
    lines: list[str] = []
    (run,) = run_demo(
        config, Servers(postgres=f"{POSTGRES}/postgres", redis=REDIS), tmp_path,
        strategies=[Strategy.LEAST_CONFIDENT], keep=True, echo=lines.append,
    )  # fmt: skip
    database = str(psycopg.conninfo.conninfo_to_dict(run.database_url)["dbname"])
    try:
        first, last = run.rounds[0], run.rounds[-1]
        assert last.accuracy > first.accuracy, lines
        assert last.traffic == 300 and last.labels >= 2 * 45
        assert last.share_reviewed < 0.35
        table = [line for line in lines if line.startswith("least_confident ")]
        assert len(table) == 3  # round 0 and two rounds
        assert run.served_after == last.champion  # the service followed the promotions

        with psycopg.connect(run.database_url) as conn:
            reviewed: dict[str, str] = dict(conn.execute(
                "SELECT prediction_id::text, label FROM review_state WHERE status = 'reviewed'"
            ).fetchall())  # fmt: skip
            validation = dataset_store.current_validation(conn=conn, model_name=run.model_name)
        assert validation is not None
        assert len(reviewed) >= 60
        held_out = read_version(validation.uri)
        held_out_inputs = {hashlib.sha256(x.tobytes()).hexdigest() for x in held_out.inputs}
        class_names = [str(c) for c in range(10)]
        # Every reviewed item is in the last version, with its current label.
        compiled = read_version(run.datasets[-1].uri)
        labels = {i: class_names[k] for i, k in zip(compiled.item_ids, compiled.labels, strict=True)}
        assert {i: labels.get(i) for i in reviewed} == reviewed
        # No validation item or input ever reaches a training version.
        for version in run.datasets:
            rows = read_version(version.uri)
            assert not set(rows.item_ids) & set(held_out.item_ids)
            assert not {hashlib.sha256(x.tobytes()).hexdigest() for x in rows.inputs} & held_out_inputs
        # The first model's rows are the skewed sample: none of one class.
        first_rows = run.datasets[0].per_class
        assert [first_rows.get(c, 0) for c in class_names] == list(digits.DEMO_INITIAL_PER_CLASS)
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
