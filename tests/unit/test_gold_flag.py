"""The gold-accuracy flag: at least ten scored answers, and the upper end of Wilson's 95% interval
below the target (values of the interval by hand: 7/10 reaches 0.892, 8/10 reaches 0.943)."""

from __future__ import annotations

import pytest

from feedback.review.quality import GOLD_MIN_ANSWERS, ReviewerQuality, Targets, gold_flagged

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("right", "scored", "target", "flagged"),
    [
        (7, 10, 0.9, True),  # 0.70, interval up to 0.892
        (8, 10, 0.9, False),  # 0.80, interval up to 0.943
        (8, 10, 0.95, True),
        (0, 9, 0.9, False),  # too few answers, however wrong
        (4, 6, 0.95, False),
        (180, 200, 0.95, True),  # 0.90, interval up to 0.934
        (0, 0, 0.9, False),
    ],
)
def test_gold_flag(right: int, scored: int, target: float, flagged: bool) -> None:
    assert GOLD_MIN_ANSWERS == 10
    assert gold_flagged(right, scored, target) is flagged


def test_targets_flag_gold_by_the_same_rule() -> None:
    def figures(right: int, scored: int) -> ReviewerQuality:
        return ReviewerQuality(reviewer="r", verdicts=10, active_days=1, per_day=10, median_seconds=None, agreed=0,
                               settled=0, agreement=None, undos=0, undo_rate=0, discards=0, discard_rate=0,
                               gold_right=right, gold_scored=scored, gold_accuracy=right / scored)  # fmt: skip

    assert Targets().flags(figures(7, 10)) == ["gold_accuracy"]
    assert Targets().flags(figures(8, 10)) == []
    assert Targets(min_gold_accuracy=None).flags(figures(0, 20)) == []


def test_simulated_gold_answers_flag_the_careless_reviewer_and_not_a_careful_one() -> None:
    import numpy as np

    from experiments.reviewer_quality import gold_figures

    careful, careless = gold_figures(trials=40, limit=200, rng=np.random.default_rng(0))
    assert careless["error_rate"] == 0.3 and careless["flagged_share"] == 1.0
    assert careless["median"] is not None and GOLD_MIN_ANSWERS <= careless["median"] <= 40
    assert careful["error_rate"] == 0.02 and careful["flagged_share"] <= 0.05
