"""Shadows: a stored version of a model that sees a share of the model's live requests after their
clients were answered, so that reviewers judge it on today's traffic before it answers anyone.

One live shadow a model at a time (Postgres enforces it). Starting, stopping and every automatic
stop (a promotion, a shadow that fails) are recorded with who and why, and announced on Redis so
that every worker loads or drops the shadow at once; a worker that missed the message reads the
live shadow when it starts and on its periodic check.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row

from feedback.champion import stored_version
from feedback.errors import Conflict, Invalid, NotFound
from feedback.keys import Keys
from feedback.review.audit import audit
from feedback.review.users import User

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shadow:
    id: int
    model_name: str
    model_version: str
    share: float  # of the model's prediction requests mirrored to the shadow
    started_at: datetime
    started_by: str | None
    stopped_at: datetime | None
    stopped_by: str | None
    stop_reason: str | None

    @property
    def live(self) -> bool:
        return self.stopped_at is None


def start(*, conn: psycopg.Connection, model_name: str, model_version: str, share: float, actor: User | None) -> Shadow:
    """Start a shadow of `model_name` at `model_version` (a stored version) for `share` of its
    requests. `Conflict` while another shadow of the model is live; `NotFound` for a version not
    in the store; `Invalid` for a share outside (0, 1]."""
    if not (math.isfinite(share) and 0 < share <= 1):
        raise Invalid(f"share must be more than 0 and at most 1, got {share}")
    stored = stored_version(model_name, model_version)
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO shadows (model_name, model_version, share, started_by) VALUES (%s, %s, %s, %s)"
                " RETURNING id",
                (model_name, stored.version, share, actor.id if actor else None),
            ).fetchone()
            assert row is not None
            audit(conn, actor, "shadow.start", f"{model_name}:{stored.version}", share=share)
    except psycopg.errors.UniqueViolation:
        live = current(conn=conn, model_name=model_name)
        running = f"{live.model_name}:{live.model_version}" if live else "another version"
        raise Conflict(f"{running} is already shadowing {model_name}: stop it first") from None
    return _shadows(conn, "s.id = %s", (int(row[0]),))[0]


def stop(*, conn: psycopg.Connection, model_name: str, reason: str, actor: User | None) -> Shadow:
    """Stop the model's live shadow, saying why; `NotFound` when none is live."""
    if not reason.strip():
        raise Invalid("stopping a shadow needs a reason")
    with conn.transaction():
        row = conn.execute(
            "UPDATE shadows SET stopped_at = now(), stopped_by = %s, stop_reason = %s"
            " WHERE model_name = %s AND stopped_at IS NULL RETURNING id, model_version",
            (actor.id if actor else None, reason, model_name),
        ).fetchone()
        if row is None:
            raise NotFound(f"no shadow of {model_name} is running")
        audit(conn, actor, "shadow.stop", f"{model_name}:{row[1]}", reason=reason)
    return _shadows(conn, "s.id = %s", (int(row[0]),))[0]


def current(*, conn: psycopg.Connection, model_name: str) -> Shadow | None:
    """The model's live shadow, if one is running."""
    found = _shadows(conn, "s.model_name = %s AND s.stopped_at IS NULL", (model_name,))
    return found[0] if found else None


def history(*, conn: psycopg.Connection, model_name: str) -> list[Shadow]:
    """Every shadow of the model, oldest first."""
    return _shadows(conn, "s.model_name = %s", (model_name,))


def _shadows(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> list[Shadow]:
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "SELECT s.id, s.model_name, s.model_version, s.share, s.started_at, a.name AS started_by,"
            " s.stopped_at, b.name AS stopped_by, s.stop_reason FROM shadows s"
            " LEFT JOIN users a ON a.id = s.started_by LEFT JOIN users b ON b.id = s.stopped_by"
            f" WHERE {where} ORDER BY s.id",
            params,
        ).fetchall()
    return [Shadow(**{**row, "share": float(row["share"])}) for row in rows]


def announce(client: redis.Redis, keys: Keys, model_name: str, shadow: Shadow | None) -> None:
    """Tell every worker which shadow the model has now (None: none): the key for those that start
    or missed it, the message for the rest."""
    message = json.dumps(
        {"model_name": model_name}
        | ({} if shadow is None else {"model_version": shadow.model_version, "share": shadow.share})
    )
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.shadow(model_name), message)
    pipe.publish(keys.shadows, message)
    pipe.execute()
    logger.info("announced the shadow of %s: %s", model_name, message)


# -- the evidence -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    correct: int
    judged: int
    low: float  # the 95% Wilson score interval
    high: float

    @property
    def value(self) -> float | None:
        return None if self.judged == 0 else self.correct / self.judged


@dataclass(frozen=True)
class Latency:
    """A model's call times on the shadowed samples, each sample counted once (milliseconds; None
    before any was timed). The answer's call is its batch's queue and inference as the request
    waited for it; the shadow's is the call that ran it, which takes many answered batches at once."""

    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class Evidence:
    """How a shadow compares with the champion on the live items both predicted."""

    model_name: str
    shadow_version: str
    shadowed: int  # samples the shadow predicted (and were ingested)
    agreed: int  # ... with the same label as the answer
    judged: int  # ... that reviewers settled with a label
    champion: Accuracy  # on the judged ones, whichever version answered each
    shadow: Accuracy
    only_champion_right: int  # McNemar's discordant pairs
    only_shadow_right: int
    p_value: float  # McNemar's exact test (two-sided) that both are as often right
    answer_latency: Latency = Latency(None, None)
    shadow_latency: Latency = Latency(None, None)

    @property
    def agreement(self) -> float | None:
        return None if self.shadowed == 0 else self.agreed / self.shadowed


def evidence(*, conn: psycopg.Connection, shadow: Shadow) -> Evidence:
    """The shadow's evidence so far: every sample it predicted since it started, the answers given
    for them, and the labels reviewers settled on, counted in Postgres."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE sp.label = p.label), count(rs.label),"
        " count(*) FILTER (WHERE p.label = rs.label), count(*) FILTER (WHERE sp.label = rs.label),"
        " count(*) FILTER (WHERE p.label = rs.label AND sp.label <> rs.label),"
        " count(*) FILTER (WHERE sp.label = rs.label AND p.label <> rs.label),"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY sp.answer_ms),"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY sp.answer_ms),"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY sp.shadow_ms),"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY sp.shadow_ms)"
        " FROM shadow_predictions sp"
        " JOIN predictions p ON p.created_at = sp.created_at AND p.id = sp.prediction_id"
        " LEFT JOIN review_state rs ON rs.prediction_id = sp.prediction_id AND rs.status = 'reviewed'"
        " WHERE sp.model_name = %s AND sp.model_version = %s AND sp.created_at >= %s",
        (shadow.model_name, shadow.model_version, shadow.started_at),
    ).fetchone()
    assert row is not None  # an aggregate answers one row
    shadowed, agreed, judged, champion_right, shadow_right, only_champion, only_shadow = (int(n) for n in row[:7])
    answer_p50, answer_p95, shadow_p50, shadow_p95 = row[7:]
    return Evidence(
        model_name=shadow.model_name,
        shadow_version=shadow.model_version,
        shadowed=shadowed,
        agreed=agreed,
        judged=judged,
        champion=wilson(champion_right, judged),
        shadow=wilson(shadow_right, judged),
        only_champion_right=only_champion,
        only_shadow_right=only_shadow,
        p_value=mcnemar_exact(only_champion, only_shadow),
        answer_latency=Latency(answer_p50, answer_p95),
        shadow_latency=Latency(shadow_p50, shadow_p95),
    )


@dataclass(frozen=True)
class Moment:
    """The judged items up to the end of one stretch of a shadow's time, for a plot of both
    accuracies as the evidence grew (by when the items were predicted)."""

    until: datetime
    judged: int
    champion_correct: int
    shadow_correct: int


def timeline(*, conn: psycopg.Connection, shadow: Shadow, points: int = 48) -> list[Moment]:
    """Both accuracies' counts at the end of each of at most `points` equal stretches of the
    shadow's time (from its start to its stop, or to now), cumulative; stretches without a judged
    item are left out."""
    rows = conn.execute(
        "WITH span AS (SELECT %s::timestamptz AS t0, greatest(coalesce(%s::timestamptz, now()) - %s::timestamptz,"
        " interval '1 second') / %s AS width)"
        " SELECT date_bin(span.width, p.created_at, span.t0) + span.width, count(*),"
        " count(*) FILTER (WHERE p.label = rs.label), count(*) FILTER (WHERE sp.label = rs.label)"
        " FROM span, shadow_predictions sp"
        " JOIN predictions p ON p.created_at = sp.created_at AND p.id = sp.prediction_id"
        " JOIN review_state rs ON rs.prediction_id = sp.prediction_id AND rs.status = 'reviewed'"
        " WHERE sp.model_name = %s AND sp.model_version = %s AND sp.created_at >= span.t0 GROUP BY 1 ORDER BY 1",
        (shadow.started_at, shadow.stopped_at, shadow.started_at, points, shadow.model_name, shadow.model_version),
    ).fetchall()
    moments, judged, champion, mine = [], 0, 0, 0
    for until, n, c, s in rows:
        judged, champion, mine = judged + n, champion + c, mine + s
        moments.append(Moment(until=until, judged=judged, champion_correct=champion, shadow_correct=mine))
    return moments


def wilson(correct: int, n: int, z: float = 1.959963984540054) -> Accuracy:
    """The accuracy's 95% Wilson score interval (sound at small n and near 0 or 1)."""
    if n == 0:
        return Accuracy(correct=0, judged=0, low=0.0, high=1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Accuracy(correct=correct, judged=n, low=max(0.0, centre - half), high=min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for `b` and `c` discordant pairs: the binomial test of
    min(b, c) successes in b + c trials at one half."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / (1 << n)
    return min(1.0, 2 * tail)


# -- the decision -----------------------------------------------------------------------------------


class Policy(StrEnum):
    # Passes the frozen-set gate, and is not worse on the judged live items at the significance.
    NOT_WORSE = "not_worse"
    # Is better on the judged live items at the significance, with at least `min_judged` of them.
    BETTER = "better"


@dataclass(frozen=True)
class Rules:
    """How a shadow is decided on: the policy on live items, its significance and the judged items
    it needs, and the frozen-set gate's margin."""

    policy: Policy = Policy.NOT_WORSE
    alpha: float = 0.05
    min_judged: int = 50
    margin: float = 0.0


@dataclass(frozen=True)
class Judgement:
    promote: bool
    reason: str


def judge(found: Evidence, *, frozen_passed: bool, rules: Rules) -> Judgement:
    """Whether the shadow replaces the champion on both pieces of evidence, and why."""
    alpha, min_judged = rules.alpha, rules.min_judged
    b, c = found.only_champion_right, found.only_shadow_right
    pairs = f"McNemar p = {found.p_value:.4f} on {b} items only the answer got right and {c} only the shadow did"
    if found.judged < min_judged:
        return Judgement(False, f"{found.judged} judged live items, fewer than the {min_judged} the policy needs")
    worse = found.p_value < alpha and b > c
    better = found.p_value < alpha and c > b
    if rules.policy is Policy.NOT_WORSE:
        if not frozen_passed:
            return Judgement(False, "it does not pass the frozen-set gate")
        if worse:
            return Judgement(False, f"worse on live items at p < {alpha}: {pairs}")
        return Judgement(True, f"passes the frozen-set gate and is not worse on live items at p < {alpha}: {pairs}")
    if better:
        return Judgement(True, f"better on live items at p < {alpha}: {pairs}")
    return Judgement(False, f"not better on live items at p < {alpha}: {pairs}")


def figures(found: Evidence) -> dict[str, Any]:
    """The evidence as stored with a decision."""
    return {
        "shadow_version": found.shadow_version,
        "shadowed": found.shadowed,
        "agreed": found.agreed,
        "judged": found.judged,
        "champion_correct": found.champion.correct,
        "shadow_correct": found.shadow.correct,
        "only_champion_right": found.only_champion_right,
        "only_shadow_right": found.only_shadow_right,
        "p_value": found.p_value,
        "answer_latency": asdict(found.answer_latency),
        "shadow_latency": asdict(found.shadow_latency),
    }
