"""The demo's pure parts: the simulated reviewer, the skewed first sample, the report."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from experiments.demo_loop import RoundResult, StrategyRun, simulated_verdict, verdict_on_targets, write_report
from models import digits

pytestmark = pytest.mark.unit

NAMES = tuple("0123456789")


def test_a_reviewer_without_errors_confirms_right_labels_and_corrects_wrong_ones() -> None:
    rng = np.random.default_rng(0)
    right = simulated_verdict(rng, model_label="3", true_label="3", class_names=NAMES, error_rate=0.0)
    wrong = simulated_verdict(rng, model_label="3", true_label="8", class_names=NAMES, error_rate=0.0)
    assert right == {"verdict": "correct"}
    assert wrong == {"verdict": "wrong", "label": "8"}


def test_a_reviewer_errs_at_the_set_rate_and_never_towards_the_truth() -> None:
    rng = np.random.default_rng(1)
    answers = [
        simulated_verdict(rng, model_label="3", true_label="3", class_names=NAMES, error_rate=0.2) for _ in range(4000)
    ]
    wrong = [a for a in answers if a["verdict"] == "wrong"]
    assert 0.17 < len(wrong) / len(answers) < 0.23
    assert all(a["label"] != "3" for a in wrong)
    assert len(Counter(a["label"] for a in wrong)) == 9  # any other class


def test_the_skewed_subset_has_the_counts_asked_for_and_is_seeded() -> None:
    data = digits.load()
    pool = list(range(0, len(data.labels), 2))
    chosen = digits.skewed_subset(data.labels, pool, digits.DEMO_INITIAL_PER_CLASS, seed=3)
    counts = Counter(int(data.labels[i]) for i in chosen)
    assert [counts.get(c, 0) for c in range(10)] == list(digits.DEMO_INITIAL_PER_CLASS)
    assert set(chosen) <= set(pool)
    assert chosen == digits.skewed_subset(data.labels, pool, digits.DEMO_INITIAL_PER_CLASS, seed=3)
    assert chosen != digits.skewed_subset(data.labels, pool, digits.DEMO_INITIAL_PER_CLASS, seed=4)
    with pytest.raises(ValueError, match="class 0 has"):
        digits.skewed_subset(data.labels, pool, (10_000,), seed=0)


def rounds(strategy: str, accuracies: list[float], per_round: int = 100) -> StrategyRun:
    run = StrategyRun(strategy=strategy, model_name="m", database_url="")
    for i, accuracy in enumerate(accuracies):
        run.rounds.append(RoundResult(
            strategy=strategy, round=i, traffic=1000 * i, labels=per_round * i, items_reviewed=90 * i,
            share_reviewed=0.09 if i else 0.0, disputes=i, fleiss_kappa=0.9 if i else None,
            candidate_accuracy=accuracy, accuracy=accuracy, decision="promoted", champion=f"v{i}", dataset_id=f"d{i}",
        ))  # fmt: skip
    return run


def test_the_report_states_each_target_with_its_figure(tmp_path: Path) -> None:
    lc = rounds("least_confident", [0.72, 0.90, 0.95, 0.975])
    random = rounds("random", [0.72, 0.91, 0.93, 0.96])
    lines = verdict_on_targets([lc, random])
    assert lines[0] == (
        "least_confident: 0.7200 -> 0.9750 in 3 rounds; labels 300 for 3000 predictions (10.0%); "
        "97% reached in round 3 with 300 labels"
    )
    assert lines[1].endswith("97% not reached")
    assert lines[2] == "least confident above random in 2 of 2 rounds after the first"
    csv_path, png = write_report([lc, random], tmp_path)
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[3]["strategy"] == "least_confident" and float(table[3]["accuracy"]) == 0.975
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
