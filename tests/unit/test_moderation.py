from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

from feedback.review.moderation import (
    DISCARDED,
    Annotation,
    Opinion,
    Status,
    Verdict,
    agreement,
    cohen_kappa,
    decide,
    fleiss_kappa,
    verdict_problem,
)

pytestmark = pytest.mark.unit


def a(revision: int, actor: int, verdict: str, label: str | None = None) -> Annotation:
    return Annotation(revision, actor, Verdict(verdict), label)


@pytest.mark.parametrize(
    ("history", "required", "status", "label"),
    [
        ([], 1, Status.UNREVIEWED, None),
        ([a(1, 1, "correct")], 1, Status.REVIEWED, "3"),
        ([a(1, 1, "wrong", "8")], 1, Status.REVIEWED, "8"),
        ([a(1, 1, "discard")], 1, Status.DISCARDED, None),
        ([a(1, 1, "unsure")], 1, Status.UNREVIEWED, None),
        ([a(1, 1, "correct")], 2, Status.UNREVIEWED, None),  # one of two reviews
        ([a(1, 1, "correct"), a(2, 2, "correct")], 2, Status.REVIEWED, "3"),
        ([a(1, 1, "correct"), a(2, 2, "wrong", "8")], 2, Status.DISPUTED, None),
        ([a(1, 1, "correct"), a(2, 2, "wrong", "8"), a(3, 9, "resolve", "8")], 2, Status.REVIEWED, "8"),
        ([a(1, 1, "correct"), a(2, 2, "discard"), a(3, 9, "resolve", None)], 2, Status.DISCARDED, None),
        ([a(1, 1, "wrong", "5"), a(2, 1, "correct")], 1, Status.REVIEWED, "3"),  # own later revision wins
        ([a(1, 1, "correct"), a(2, 1, "unsure")], 1, Status.UNREVIEWED, None),  # unsure withdraws
        ([a(1, 1, "added", "4")], 1, Status.REVIEWED, "4"),
    ],
)
def test_decide(history: list[Annotation], required: int, status: Status, label: str | None) -> None:
    decision = decide(history, predicted="3", required=required)
    assert (decision.status, decision.label) == (status, label)


@pytest.mark.parametrize(
    ("verdict", "label", "refused"),
    [
        (Verdict.WRONG, "3", True),  # the model said 3: that is a 'correct' verdict
        (Verdict.WRONG, "8", False),
        (Verdict.CORRECT, None, False),
        (Verdict.DISCARD, None, False),
        (Verdict.UNSURE, None, False),
    ],
)
def test_a_wrong_verdict_cannot_name_the_models_own_label(verdict: Verdict, label: str | None, refused: bool) -> None:
    problem = verdict_problem(verdict, label, predicted="3")
    if refused:
        assert problem is not None and "the label proposed" in problem and "'correct'" in problem
    else:
        assert problem is None


def test_cohen_kappa_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.choice(list("abcd"), size=60)
        y = np.where(rng.random(60) < 0.6, x, rng.choice(list("abcd"), size=60))
        assert cohen_kappa(list(x), list(y)) == pytest.approx(cohen_kappa_score(x, y))


def test_fleiss_kappa_matches_statsmodels() -> None:
    rng = np.random.default_rng(1)
    for raters in (2, 3, 5):
        truth = rng.choice(list("xyz"), size=40)
        ratings = [[t if rng.random() < 0.7 else str(rng.choice(list("xyz"))) for _ in range(raters)] for t in truth]
        table, _ = aggregate_raters(np.array(ratings))
        assert fleiss_kappa(ratings) == pytest.approx(sm_fleiss(table, method="fleiss"))


def test_perfect_agreement_is_one() -> None:
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0
    assert fleiss_kappa([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)


def test_fleiss_needs_equal_rater_counts() -> None:
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([["a", "b"], ["a"]])


def test_agreement_report() -> None:
    opinions = [
        Opinion("i1", "3", "ann", 1, Verdict.CORRECT, None),
        Opinion("i1", "3", "bob", 2, Verdict.CORRECT, None),
        Opinion("i2", "5", "ann", 3, Verdict.WRONG, "6"),
        Opinion("i2", "5", "bob", 4, Verdict.CORRECT, None),
        Opinion("i3", "1", "ann", 5, Verdict.DISCARD, None),
        Opinion("i3", "1", "bob", 6, Verdict.DISCARD, None),
    ]
    finals = {"i1": ("reviewed", "3"), "i2": ("reviewed", "6"), "i3": ("discarded", None)}
    report = agreement(opinions, finals)
    (pair,) = report.pairs
    assert pair["items"] == 3
    assert pair["cohen_kappa"] == pytest.approx(cohen_kappa_score(["3", "6", DISCARDED], ["3", "5", DISCARDED]))
    assert report.fleiss_items == 3 and report.fleiss_raters == 2
    assert [d["item"] for d in report.disagreements] == ["i2"]
    by_name = {r["name"]: r for r in report.reviewers}
    assert by_name["ann"]["agreement_with_final"] == 1.0
    assert by_name["bob"]["agreement_with_final"] == pytest.approx(2 / 3)


def test_undo_withdraws_the_reviewers_opinion_and_nothing_else() -> None:
    history = [
        Annotation(1, actor_id=1, verdict=Verdict.CORRECT, label=None),
        Annotation(2, actor_id=2, verdict=Verdict.WRONG, label="4"),
        Annotation(3, actor_id=2, verdict=Verdict.UNDO, label=None),
    ]
    decision = decide(history, predicted="3", required=1)
    assert (decision.status, decision.label, decision.reviewers) == (Status.REVIEWED, "3", 1)
    alone = decide([history[0], Annotation(4, actor_id=1, verdict=Verdict.UNDO, label=None)], predicted="3", required=1)
    assert (alone.status, alone.reviewers) == (Status.UNREVIEWED, 0)
