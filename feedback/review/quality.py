"""Per-reviewer quality over a period, each figure against a target an admin sets.

For every user who gave verdicts in the period: how many and how many a day they were active, the
median seconds from a lease to its verdict, how often their label agrees with the item's settled
label (their latest verdict on each item that is settled now, counted when it says a label), their
undo and discard rates, and their accuracy on gold items (`feedback.review.gold`) with Wilson's 95%
interval. A figure beyond its target is flagged (gold accuracy once there are ten answers and its
whole interval is below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from feedback.errors import Invalid
from feedback.review import gold
from feedback.review.audit import audit
from feedback.review.users import User
from models.health import judged_accuracy

GOLD_MIN_ANSWERS = 10  # gold answers a reviewer gives before their gold accuracy can flag them


def gold_flagged(right: int, scored: int, target: float) -> bool:
    """Whether `right` of `scored` gold answers are confidently below `target`: at least
    GOLD_MIN_ANSWERS, and the upper end of Wilson's 95% interval below it."""
    interval = judged_accuracy(right, scored - right)
    return scored >= GOLD_MIN_ANSWERS and interval is not None and interval.high < target


@dataclass(frozen=True)
class Targets:
    """What an admin expects of a reviewer; None: no target for that figure."""

    min_per_day: float | None = None
    max_median_seconds: float | None = None
    min_agreement: float | None = 0.9
    max_undo_rate: float | None = 0.1
    max_discard_rate: float | None = 0.2
    min_gold_accuracy: float | None = 0.9

    def flags(self, q: ReviewerQuality) -> list[str]:
        """The figures of `q` beyond their targets; gold accuracy when confidently below its target
        (`gold_flagged`), so that a few unlucky answers flag nobody."""
        checks = [
            ("per_day", q.per_day, self.min_per_day, False),
            ("median_seconds", q.median_seconds, self.max_median_seconds, True),
            ("agreement", q.agreement, self.min_agreement, False),
            ("undo_rate", q.undo_rate, self.max_undo_rate, True),
            ("discard_rate", q.discard_rate, self.max_discard_rate, True),
        ]
        flags = [
            name
            for name, value, target, at_most in checks
            if value is not None and target is not None and (value > target if at_most else value < target)
        ]
        target = self.min_gold_accuracy
        if target is not None and gold_flagged(q.gold_right, q.gold_scored, target):
            flags.append("gold_accuracy")
        return flags


@dataclass(frozen=True)
class ReviewerQuality:
    reviewer: str
    verdicts: int  # correct, wrong, discard and unsure given in the period
    active_days: int
    per_day: float  # verdicts per active day
    median_seconds: float | None  # from the lease to the verdict (verdicts given through the queue)
    agreed: int  # of `settled`, where their label is the settled one
    settled: int  # items now settled on which their latest verdict says a label
    agreement: float | None
    undos: int
    undo_rate: float  # undos per verdict
    discards: int
    discard_rate: float
    gold_right: int = 0  # gold items answered with their gold label
    gold_scored: int = 0  # gold items answered with a label (or discarded), not withdrawn
    gold_accuracy: float | None = None
    gold_low: float | None = None  # Wilson's 95% interval
    gold_high: float | None = None
    flags: list[str] = field(default_factory=list)


_FIGURES = """
WITH mine AS (
    SELECT a.actor_id, a.prediction_id, a.verdict, a.label, a.seconds, a.at, p.label AS predicted
    FROM annotations a JOIN predictions p ON p.created_at = a.item_created_at AND p.id = a.prediction_id
    WHERE a.at >= %(since)s AND a.at < %(until)s AND a.verdict IN ('correct', 'wrong', 'discard', 'unsure', 'undo')
), latest AS (
    SELECT DISTINCT ON (actor_id, prediction_id) actor_id, prediction_id, verdict,
        CASE verdict WHEN 'correct' THEN coalesce(label, predicted) WHEN 'wrong' THEN label END AS said
    FROM mine ORDER BY actor_id, prediction_id, at DESC
)
SELECT u.id, u.name,
    count(*) FILTER (WHERE m.verdict <> 'undo'),
    count(DISTINCT date_trunc('day', m.at)) FILTER (WHERE m.verdict <> 'undo'),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY m.seconds) FILTER (WHERE m.verdict <> 'undo'),
    count(*) FILTER (WHERE m.verdict = 'undo'),
    count(*) FILTER (WHERE m.verdict = 'discard'),
    (SELECT count(*) FROM latest l JOIN review_state s ON s.prediction_id = l.prediction_id
     WHERE l.actor_id = u.id AND l.said IS NOT NULL AND s.status = 'reviewed' AND s.label = l.said),
    (SELECT count(*) FROM latest l JOIN review_state s ON s.prediction_id = l.prediction_id
     WHERE l.actor_id = u.id AND l.said IS NOT NULL AND s.status = 'reviewed')
FROM mine m JOIN users u ON u.id = m.actor_id
GROUP BY u.id, u.name ORDER BY u.name
"""


def reviewer_quality(
    *, conn: psycopg.Connection, since: datetime, until: datetime, targets: Targets | None = None
) -> list[ReviewerQuality]:
    """Every reviewer who gave verdicts in [since, until), by name, flagged against `targets`."""
    targets = targets or get_targets(conn=conn)
    on_gold = gold.accuracy(conn)
    found = []
    for user_id, name, verdicts, days, median, undos, discards, agreed, settled in conn.execute(
        _FIGURES, {"since": since, "until": until}
    ):
        right, scored = on_gold.get(user_id, (0, 0))
        interval = judged_accuracy(right, scored - right)
        quality = ReviewerQuality(
            reviewer=name,
            verdicts=int(verdicts),
            active_days=int(days),
            per_day=verdicts / days if days else 0.0,
            median_seconds=None if median is None else float(median),
            agreed=int(agreed),
            settled=int(settled),
            agreement=agreed / settled if settled else None,
            undos=int(undos),
            undo_rate=undos / verdicts if verdicts else 0.0,
            discards=int(discards),
            discard_rate=discards / verdicts if verdicts else 0.0,
            gold_right=right,
            gold_scored=scored,
            gold_accuracy=None if interval is None else interval.value,
            gold_low=None if interval is None else interval.low,
            gold_high=None if interval is None else interval.high,
        )
        found.append(ReviewerQuality(**{**quality.__dict__, "flags": targets.flags(quality)}))
    return found


def get_targets(*, conn: psycopg.Connection) -> Targets:
    row = conn.execute("SELECT targets FROM reviewer_targets").fetchone()
    return Targets() if row is None else Targets(**row[0])


def set_targets(*, conn: psycopg.Connection, admin: User, targets: Targets) -> Targets:
    for name, value in targets.__dict__.items():
        if value is not None and value < 0:
            raise Invalid(f"target {name} must not be negative, got {value}")
    with conn.transaction():
        conn.execute(
            "INSERT INTO reviewer_targets (targets, set_by) VALUES (%s, %s)"
            " ON CONFLICT (one) DO UPDATE SET targets = excluded.targets, set_by = excluded.set_by, set_at = now()",
            (Jsonb(dict(targets.__dict__)), admin.id),
        )
        audit(conn, admin, "reviewer_targets", None, **dict[str, Any](targets.__dict__))
    return targets
