"""Labels weighted by each reviewer's reliability: Dawid-Skene over the items several reviewers judged.

Two reviewers who disagree leave an item disputed, waiting for an admin. Across many items,
though, the pattern of who agrees with whom says how reliable each reviewer is: Dawid and Skene's
model (1979) estimates every reviewer's confusion matrix and every item's label distribution
together by expectation-maximisation. We use crowd-kit's implementation (`crowdkit.aggregation.
DawidSkene`), fed each reviewer's latest opinion on each item (a class, or `DISCARDED`), with the
items an admin resolved as known labels. A disputed item whose weighted label is at least
`min_confidence` likely is settled by it when a training version is compiled with weighting; the
others still wait for an admin.

Everything is read as of an annotation watermark, so the same watermark gives the same labels (a
report without one reads every annotation committed).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import psycopg

from feedback.review.moderation import DISCARDED, Annotation, Status, Verdict, decide, latest_by_reviewer

logger = logging.getLogger(__name__)

METHOD = "dawid-skene"
MIN_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Weighting:
    """Whether a training version takes the disputes weighted labels settle, and how likely they must be."""

    enabled: bool = False
    min_confidence: float = MIN_CONFIDENCE


UNWEIGHTED = Weighting()


def library() -> str:
    """The aggregation library and its version, as the manifest records it."""
    return f"crowd-kit {version('crowd-kit')}"


@dataclass(frozen=True)
class Judged:
    """An item several reviewers judged, as of a watermark."""

    id: uuid.UUID
    opinions: dict[int, str]  # reviewer id -> their latest opinion (a class or DISCARDED)
    status: Status  # by the moderation rules
    resolved: str | None = None  # an admin's resolution (a class or DISCARDED), a known label


@dataclass(frozen=True)
class Weighted:
    """Dawid-Skene's answer: each item's most likely label and its probability, each reviewer's accuracy."""

    labels: dict[uuid.UUID, tuple[str, float]] = field(default_factory=dict)
    reliability: dict[int, float] = field(default_factory=dict)  # sum over labels of prior * P(says it | it)


def dawid_skene(items: Sequence[Judged], *, iterations: int = 100) -> Weighted:
    """Fit Dawid-Skene to the reviewers' opinions (admin resolutions as known labels)."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    ordered = sorted(items, key=lambda i: i.id)
    rows = [(str(i.id), w, o) for i in ordered for w, o in sorted(i.opinions.items())]
    if not rows:
        return Weighted()
    said = {o for _, _, o in rows}
    known = {str(i.id): i.resolved for i in ordered if i.resolved in said}  # a label nobody said cannot anchor
    data = pd.DataFrame(rows, columns=["task", "worker", "label"])
    model = DawidSkene(n_iter=iterations)
    probas = model.fit_predict_proba(data, true_labels=pd.Series(known, dtype=object) if known else None)
    best, chance = probas.idxmax(axis=1), probas.max(axis=1)
    labels = {uuid.UUID(str(t)): (str(best[t]), float(chance[t])) for t in probas.index}
    return Weighted(labels=labels, reliability=_accuracies(model.errors_, model.priors_))


def _accuracies(errors: Any, priors: Any) -> dict[int, float]:
    """Each reviewer's chance of saying the true label: Σ_k prior(k) · P(says k | k)."""
    accuracy: dict[int, float] = {}
    for (worker, said), row in errors.iterrows():
        if said in priors.index:
            accuracy[int(worker)] = accuracy.get(int(worker), 0.0) + float(priors[said]) * float(row[said])
    return accuracy


# Every annotation up to the watermark of the model's items that two or more reviewers judged.
_JUDGED = """
    SELECT a.prediction_id, p.label, s.required_reviews,
           array_agg(a.id ORDER BY a.id), array_agg(a.actor_id ORDER BY a.id),
           array_agg(a.verdict ORDER BY a.id), array_agg(a.label ORDER BY a.id)
    FROM annotations a
    JOIN predictions p ON p.created_at = a.item_created_at AND p.id = a.prediction_id
    JOIN review_state s ON s.prediction_id = a.prediction_id
    WHERE (%(w)s::bigint IS NULL OR a.id <= %(w)s) AND p.model_name = %(m)s AND p.source = 'model'
      AND a.prediction_id IN (
          SELECT b.prediction_id FROM annotations b
          WHERE (%(w)s::bigint IS NULL OR b.id <= %(w)s) AND b.verdict IN ('correct', 'wrong', 'discard')
          GROUP BY b.prediction_id HAVING count(DISTINCT b.actor_id) >= 2)
    GROUP BY a.prediction_id, p.label, s.required_reviews
"""


def judged(*, conn: psycopg.Connection, model_name: str, watermark: int | None) -> list[Judged]:
    """The model's items with opinions of two or more reviewers as of `watermark` (None: now)."""
    found = []
    for item, predicted, required, revisions, actors, verdicts, labels in conn.execute(
        _JUDGED, {"w": watermark, "m": model_name}
    ):
        history = [
            Annotation(revision=int(r), actor_id=int(u), verdict=Verdict(v), label=lab)
            for r, u, v, lab in zip(revisions, actors, verdicts, labels, strict=True)
        ]
        opinions = latest_by_reviewer(history, predicted)
        if len(opinions) < 2:  # an undo or an unsure took one back
            continue
        finals = [a for a in history if a.verdict is Verdict.RESOLVE]
        resolved = (finals[-1].label or DISCARDED) if finals else None
        status = decide(history, predicted=predicted, required=int(required)).status
        found.append(Judged(id=item, opinions=opinions, status=status, resolved=resolved))
    return found


@dataclass(frozen=True)
class Settlement:
    """What weighting settles among the disputes as of a watermark, for a manifest and a report."""

    labels: dict[uuid.UUID, str]  # disputed items it settles with a class
    disputed: frozenset[uuid.UUID]  # every disputed item
    discarded: int  # disputed items it settles as discarded (left out, as a discard is)
    unsettled: int  # disputed items below `min_confidence`: still for an admin
    weighted: Weighted
    min_confidence: float

    def manifest(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "library": library(),
            "min_confidence": self.min_confidence,
            "judged_items": len(self.weighted.labels),
            "settled_disputes": len(self.labels),
            "discarded_disputes": self.discarded,
            "unsettled_disputes": self.unsettled,
        }


def settle(
    *, conn: psycopg.Connection, model_name: str, watermark: int | None, min_confidence: float = MIN_CONFIDENCE
) -> Settlement:
    """The disputes (as of `watermark`; None: now) that the weighted labels settle at `min_confidence`."""
    if not 0.5 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0.5, 1], not {min_confidence}")
    items = judged(conn=conn, model_name=model_name, watermark=watermark)
    weighted = dawid_skene(items)
    labels: dict[uuid.UUID, str] = {}
    discarded = unsettled = 0
    for item in items:
        if item.status is not Status.DISPUTED:
            continue
        label, chance = weighted.labels[item.id]
        if chance < min_confidence:
            unsettled += 1
        elif label == DISCARDED:
            discarded += 1
        else:
            labels[item.id] = label
    logger.info(
        "weighted labels of %s at watermark %s: %d judged items, %d disputes settled, %d discarded, %d unsettled",
        model_name,
        watermark,
        len(items),
        len(labels),
        discarded,
        unsettled,
    )
    disputed = frozenset(i.id for i in items if i.status is Status.DISPUTED)
    return Settlement(labels, disputed, discarded, unsettled, weighted, min_confidence)


def names(conn: psycopg.Connection, reliability: Mapping[int, float]) -> dict[str, float]:
    """Reliability by reviewer name."""
    rows = conn.execute("SELECT id, name FROM users WHERE id = ANY(%s)", (list(reliability),)).fetchall()
    return {name: reliability[int(i)] for i, name in rows}
