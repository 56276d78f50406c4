"""The shadow's evidence figures against reference implementations (statsmodels, scipy)."""

from __future__ import annotations

import itertools

import pytest
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from feedback.shadow import mcnemar_exact, wilson

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("b", "c"), [*itertools.product([0, 1, 2, 5, 13], [0, 1, 3, 8]), (40, 61), (300, 250)])
def test_mcnemars_exact_test_is_statsmodels_and_scipys(b: int, c: int) -> None:
    ours = mcnemar_exact(b, c)
    # statsmodels takes the 2x2 table of (champion right?, shadow right?); only the discordant cells count.
    reference = mcnemar([[7, b], [c, 11]], exact=True).pvalue
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-12)
    if b + c:
        assert ours == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("correct", "n"), [(0, 1), (1, 1), (3, 10), (97, 100), (50, 50), (412, 1000)])
def test_the_accuracy_interval_is_wilsons(correct: int, n: int) -> None:
    low, high = proportion_confint(correct, n, alpha=0.05, method="wilson")
    interval = wilson(correct, n)
    assert interval.low == pytest.approx(low, abs=1e-12) and interval.high == pytest.approx(high, abs=1e-12)
    assert interval.value == correct / n


def test_nothing_judged_says_nothing() -> None:
    assert (wilson(0, 0).low, wilson(0, 0).high, wilson(0, 0).value) == (0.0, 1.0, None)
    assert mcnemar_exact(0, 0) == 1.0
