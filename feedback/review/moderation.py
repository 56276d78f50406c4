"""Moderation rules and agreement figures: pure functions, no SQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Verdict(StrEnum):
    CORRECT = "correct"  # the label shown is right: the model's, or in a blind review `label`
    WRONG = "wrong"  # the model's label is wrong; `label` is the right one
    DISCARD = "discard"  # keep out of training (unusable input); `reason` says why
    UNSURE = "unsure"  # the reviewer cannot tell; the item goes back to the queue
    ADDED = "added"  # a sample the model missed, added by a reviewer with its label
    RESOLVE = "resolve"  # an admin settles a dispute: `label`, or discard when it is null
    ERASE = "erase"  # an admin erased the input (data-removal request)
    UNDO = "undo"  # a reviewer took back their latest verdict (withdraws their opinion)


class Status(StrEnum):
    UNREVIEWED = "unreviewed"  # fewer agreeing verdicts than the item requires
    REVIEWED = "reviewed"  # has a current label
    DISCARDED = "discarded"  # excluded from training
    DISPUTED = "disputed"  # reviewers disagree; waits for an admin


REVIEWER_VERDICTS = (Verdict.CORRECT, Verdict.WRONG, Verdict.DISCARD, Verdict.UNSURE)
DISCARDED = "<discarded>"  # the category a discard counts as in agreement figures


@dataclass(frozen=True)
class Annotation:
    revision: int
    actor_id: int
    verdict: Verdict
    label: str | None


@dataclass(frozen=True)
class Decision:
    status: Status
    label: str | None
    reviewers: int  # reviewers whose latest verdict counts


def effective_label(verdict: Verdict, label: str | None, predicted: str) -> str | None:
    """What a verdict says the label is: a class name, DISCARDED, or None (no opinion)."""
    if verdict is Verdict.CORRECT:
        return label if label is not None else predicted  # `label`: what a blind review showed
    if verdict in (Verdict.WRONG, Verdict.ADDED):
        return label
    if verdict is Verdict.DISCARD:
        return DISCARDED
    return None


def verdict_problem(verdict: Verdict, label: str | None, *, predicted: str) -> str | None:
    """Why a reviewer's verdict contradicts itself on an item the model labelled `predicted`, or None."""
    if verdict is Verdict.WRONG and label == predicted:
        # Stored as is, it would count as a correction that corrects nothing (and a disagreement).
        return f"{label!r} is the label proposed; a 'correct' verdict says that"
    return None


def latest_by_reviewer(history: Sequence[Annotation], predicted: str) -> dict[int, str]:
    """Each reviewer's latest opinion on an item (a later verdict of theirs replaces an earlier)."""
    latest: dict[int, str] = {}
    for a in sorted(history, key=lambda a: a.revision):
        if a.verdict is Verdict.UNDO:
            latest.pop(a.actor_id, None)
        elif a.verdict in REVIEWER_VERDICTS:
            opinion = effective_label(a.verdict, a.label, predicted)
            if opinion is None:
                latest.pop(a.actor_id, None)  # unsure withdraws an earlier opinion
            else:
                latest[a.actor_id] = opinion
    return latest


def decide(history: Sequence[Annotation], *, predicted: str, required: int) -> Decision:
    """The item's status and current label, from its whole annotation history."""
    ordered = sorted(history, key=lambda a: a.revision)
    opinions = latest_by_reviewer(ordered, predicted)
    final = [a for a in ordered if a.verdict in (Verdict.RESOLVE, Verdict.ADDED)]
    if final:
        last = final[-1]
        if last.label is None:
            return Decision(Status.DISCARDED, None, len(opinions))
        return Decision(Status.REVIEWED, last.label, len(opinions))
    values = set(opinions.values())
    if len(values) > 1:
        return Decision(Status.DISPUTED, None, len(opinions))
    if len(opinions) < required or not values:
        return Decision(Status.UNREVIEWED, None, len(opinions))
    (value,) = values
    if value == DISCARDED:
        return Decision(Status.DISCARDED, None, len(opinions))
    return Decision(Status.REVIEWED, value, len(opinions))


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters over the same items (1.0 when both agree on one category)."""
    if len(a) != len(b) or not a:
        raise ValueError("two equally long, non-empty rating lists are needed")
    categories = sorted(set(a) | set(b))
    index = {c: i for i, c in enumerate(categories)}
    table = np.zeros((len(categories), len(categories)))
    for x, y in zip(a, b, strict=True):
        table[index[x], index[y]] += 1
    n = table.sum()
    observed = np.trace(table) / n
    expected = float((table.sum(axis=0) * table.sum(axis=1)).sum()) / n**2
    if expected == 1.0:
        return 1.0
    return float((observed - expected) / (1 - expected))


def fleiss_kappa(ratings: Sequence[Sequence[str]]) -> float:
    """Fleiss' kappa; every item must have the same number (≥ 2) of ratings."""
    if not ratings:
        raise ValueError("no items")
    raters = len(ratings[0])
    if raters < 2 or any(len(r) != raters for r in ratings):
        raise ValueError("every item needs the same number (at least 2) of ratings")
    categories = sorted({c for r in ratings for c in r})
    table = np.array([[Counter(r)[c] for c in categories] for r in ratings], dtype=float)
    n_items = len(ratings)
    p_j = table.sum(axis=0) / (n_items * raters)
    p_i = ((table**2).sum(axis=1) - raters) / (raters * (raters - 1))
    p_bar, p_e = p_i.mean(), float((p_j**2).sum())
    if p_e == 1.0:
        return 1.0
    return float((p_bar - p_e) / (1 - p_e))


@dataclass(frozen=True)
class Opinion:
    item: str
    predicted: str
    reviewer: str
    revision: int
    verdict: Verdict
    label: str | None


@dataclass
class AgreementReport:
    pairs: list[dict[str, object]]  # reviewer a, reviewer b, items, cohen_kappa
    fleiss_kappa: float | None
    fleiss_items: int
    fleiss_raters: int
    disagreements: list[dict[str, object]]  # item, opinions by reviewer
    reviewers: list[dict[str, object]]  # name, items, agreement_with_final


def agreement(opinions: Sequence[Opinion], finals: dict[str, tuple[str, str | None]]) -> AgreementReport:
    """Agreement figures from every reviewer verdict; `finals` maps item -> (status, label)."""
    by_item: dict[str, list[Annotation]] = {}
    predicted: dict[str, str] = {}
    names: dict[int, str] = {}
    ids: dict[str, int] = {}
    for o in opinions:
        actor = ids.setdefault(o.reviewer, len(ids))
        names[actor] = o.reviewer
        predicted[o.item] = o.predicted
        by_item.setdefault(o.item, []).append(Annotation(o.revision, actor, o.verdict, o.label))
    latest = {item: latest_by_reviewer(history, predicted[item]) for item, history in by_item.items()}

    pairs = []
    people = sorted(names)
    for i, a in enumerate(people):
        for b in people[i + 1 :]:
            shared = [(op[a], op[b]) for op in latest.values() if a in op and b in op]
            if shared:
                kappa = cohen_kappa([x for x, _ in shared], [y for _, y in shared])
                pairs.append({"a": names[a], "b": names[b], "items": len(shared), "cohen_kappa": kappa})

    multi = [op for op in latest.values() if len(op) >= 2]
    counts = Counter(len(op) for op in multi)
    fleiss, fleiss_items, raters = None, 0, 0
    if counts:
        raters = counts.most_common(1)[0][0]  # Fleiss needs the same number of raters per item
        table = [list(op.values()) for op in multi if len(op) == raters]
        fleiss, fleiss_items = fleiss_kappa(table), len(table)

    disagreements: list[dict[str, object]] = [
        {"item": item, "predicted": predicted[item], "opinions": {names[k]: v for k, v in op.items()}}
        for item, op in latest.items()
        if len(set(op.values())) > 1
    ]
    reviewers = []
    for actor in people:
        mine = {item: op[actor] for item, op in latest.items() if actor in op}
        settled = [
            (value, finals[item])
            for item, value in mine.items()
            if item in finals and finals[item][0] in (Status.REVIEWED, Status.DISCARDED)
        ]
        agreeing = sum(
            1
            for value, (status, label) in settled
            if (status == Status.DISCARDED and value == DISCARDED) or (status == Status.REVIEWED and value == label)
        )
        reviewers.append(
            {
                "name": names[actor],
                "items": len(mine),
                "settled_items": len(settled),
                "agreement_with_final": agreeing / len(settled) if settled else None,
            }
        )
    return AgreementReport(pairs, fleiss, fleiss_items, raters, disagreements, reviewers)
