"""The review queue: claiming items under a lease, so that two reviewers never judge the same item
unless it asks for several reviews, and leasing an item again to the reviewer who undid a verdict.

A claim locks candidates with `SELECT ... FOR UPDATE SKIP LOCKED`, re-checks them under the locks
and writes the leases in one statement; a lease expires by itself. Functions take a connection
and keyword arguments; queries are parameterised, always.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql

from feedback.errors import Conflict
from feedback.predictions import blobs
from feedback.predictions.records import created_at as uuid_created_at
from feedback.review import gold
from feedback.review.audit import audit
from feedback.review.filters import ItemFilter, where
from feedback.review.guidelines import unread
from feedback.review.users import User


class Strategy(StrEnum):
    OLDEST = "oldest"  # first in, first reviewed
    LEAST_CONFIDENT = "least_confident"  # where the model is least sure: most to learn
    RANDOM = "random"  # a random place in time, then onwards: an unbiased sample
    DISAGREE = "disagree"  # items a shadow predicted: where it disagreed with the answer first, mixed
    # with a uniform slice of the rest (`mixed_share`), so that the estimates stay unbiased
    VALIDATION = "validation"  # the items drawn for the live validation set (`feedback.datasets.live`),
    # oldest first: judged, they become the next live validation version
    DRIFT = "drift"  # the last day's items of the segments (model, label) whose share rose most against
    # the version's reference first (`drifted`, from `feedback.health.drifted_segments`), newest first
    SUSPECT = "suspect"  # judged items whose label is probably wrong (`feedback.suspects`), most likely
    # first, each to one more reviewer at a time, until someone judges it after the ranking


# How many reviews an item needs: `overlap` for a deterministic share of items (by id), else 1.
REQUIRED_REVIEWS = sql.SQL(
    "CASE WHEN ('x' || substr(md5(p.id::text), 1, 7))::bit(28)::int %% 10000 < %(overlap_per_10k)s"
    " THEN %(overlap)s ELSE 1 END"
)
_LIVE_LEASES = sql.SQL("(SELECT count(*) FROM leases l WHERE l.prediction_id = p.id AND l.expires_at > now())")
_ELIGIBLE = sql.SQL(
    """p.source = 'model' AND (p.input IS NOT NULL OR p.input_key IS NOT NULL)
    AND (s.status IS NULL OR s.status = 'unreviewed')
    AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.prediction_id = p.id AND a.actor_id = %(user)s)
    AND NOT EXISTS (SELECT 1 FROM gold_items g WHERE g.prediction_id = p.id)
    AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.prediction_id = p.id AND l.user_id = %(user)s
                    AND l.expires_at > now())
    AND coalesce(s.reviewers, 0) + {live} < coalesce(s.required_reviews, {required})"""
).format(live=_LIVE_LEASES, required=REQUIRED_REVIEWS)
# A suspect is offered to reviewers who never judged it, one at a time, until a verdict or a
# resolution after the version it was ranked in.
_SUSPECT_ELIGIBLE = sql.SQL(
    """p.source = 'model' AND (p.input IS NOT NULL OR p.input_key IS NOT NULL)
    AND EXISTS (SELECT 1 FROM label_suspects x WHERE x.prediction_id = p.id AND NOT EXISTS (
        SELECT 1 FROM annotations a WHERE a.prediction_id = p.id AND a.id > x.watermark
        AND a.verdict IN ('correct', 'wrong', 'discard', 'resolve')))
    AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.prediction_id = p.id AND a.actor_id = %(user)s)
    AND NOT EXISTS (SELECT 1 FROM gold_items g WHERE g.prediction_id = p.id)
    AND {live} = 0"""
).format(live=_LIVE_LEASES)
_FROM_SUSPECTS = sql.SQL(
    "label_suspects x JOIN predictions p ON p.created_at = x.item_created_at AND p.id = x.prediction_id"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DRAWN = sql.SQL("EXISTS (SELECT 1 FROM live_validation_items l WHERE l.prediction_id = p.id)")
_SHADOWED = sql.SQL(
    "EXISTS (SELECT 1 FROM shadow_predictions sp WHERE sp.created_at = p.created_at AND sp.prediction_id = p.id)"
)
# Disagreements, and a deterministic uniform slice of the shadowed items (by id: other digits of the
# hash than the overlap's), come first.
_DRIFTED_FIRST = sql.SQL(
    "array_position(%(drifted)s::text[], p.model_name || '/' || p.label) NULLS LAST, p.created_at DESC, p.id"
)
DRIFT_HOURS = 24  # how far back the drift order looks

_DISAGREEMENTS_FIRST = sql.SQL(
    "CASE WHEN EXISTS (SELECT 1 FROM shadow_predictions sp WHERE sp.created_at = p.created_at"
    " AND sp.prediction_id = p.id AND sp.label <> p.label)"
    " OR ('x' || substr(md5(p.id::text), 9, 7))::bit(28)::int %% 10000 < %(mixed_per_10k)s THEN 0 ELSE 1 END,"
    " p.created_at, p.id"
)


@dataclass(frozen=True)
class Claimed:
    prediction_id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    confidence: float
    input: bytes
    expires_at: datetime
    required_reviews: int
    input_type: str | None = None  # None: .npy; else the media type of the image as sent
    scores: tuple[float, ...] = ()  # the proposing model's probabilities, in its class order
    blind: bool = False  # `label` may be the answer's or a shadow's, and the reviewer is not told which


@dataclass(frozen=True)
class _Proposal:
    label: str
    confidence: float
    scores: tuple[float, ...]


def claim(
    *,
    conn: psycopg.Connection,
    user: User,
    count: int,
    strategy: Strategy,
    lease_seconds: float,
    overlap: int = 2,
    overlap_share: float = 0.0,
    filters: ItemFilter | None = None,
    max_leases: int | None = None,
    mixed_share: float = 0.2,
    drifted: Sequence[str] = (),
    gold_share: float = 0.0,
) -> list[Claimed]:
    """Lease up to `count` items to `user`; no item is leased to more reviewers than it needs.

    `filters` narrows the queue (date range, model, version, the model's label, confidence range).
    With `max_leases`, the user's live leases stay within it: fewer items are leased when the limit
    is near, and `Conflict` says so when it is reached. `mixed_share`: see `Strategy.DISAGREE`;
    `drifted`: the segments ("model/label") of `Strategy.DRIFT`, most drifted first; `gold_share`:
    the chance of each place to hold a gold item the user never answered (`feedback.review.gold`),
    which looks like any other."""
    model_name = (filters or ItemFilter()).model_name
    waiting = unread(conn=conn, user=user, model_name=model_name)
    if waiting:
        named = ", ".join(f"{g.model_name} (version {g.version})" for g in waiting)
        raise Conflict(
            f"read the guidelines of {named} first: GET /review/guidelines, then POST /review/guidelines/read"
        )
    if max_leases is not None:
        count = min(count, max_leases - _held(conn, user, max_leases))
    golden = gold.draw_count(count, gold_share) if gold_share > 0 else 0
    with conn.transaction():
        leased = gold.lease(conn, user, count=golden, lease_seconds=lease_seconds, model_name=model_name)
        golds = [claimed_of(conn, row[:11], row[11], None) for row in leased]
    items = []
    if count > len(golds):
        items = _from_queue(
            conn=conn, user=user, count=count - len(golds), strategy=strategy, lease_seconds=lease_seconds,
            overlap=overlap, overlap_share=overlap_share, filters=filters, mixed_share=mixed_share, drifted=drifted,
        )  # fmt: skip
    for each in golds:
        items.insert(secrets.randbelow(len(items) + 1), each)
    return items


def _from_queue(
    *,
    conn: psycopg.Connection,
    user: User,
    count: int,
    strategy: Strategy,
    lease_seconds: float,
    overlap: int,
    overlap_share: float,
    filters: ItemFilter | None,
    mixed_share: float,
    drifted: Sequence[str],
) -> list[Claimed]:
    """Up to `count` items of the queue, in the strategy's order."""
    params: dict[str, Any] = {
        "user": user.id,
        "count": count,
        "overlap": overlap,
        "overlap_per_10k": round(overlap_share * 10000),
        "seconds": lease_seconds,
        "start": _EPOCH,
        "mixed_per_10k": round(mixed_share * 10000),
        "drifted": list(drifted),
    }
    narrowed, filter_params = where(filters or ItemFilter())
    if strategy is Strategy.DISAGREE:
        narrowed.append(_SHADOWED)
    if strategy is Strategy.VALIDATION:
        narrowed.append(_DRAWN)
    params.update(filter_params)
    if strategy is Strategy.RANDOM:
        params["start"] = _random_start(conn) or _EPOCH
    if strategy is Strategy.DRIFT:
        params["start"] = datetime.now(UTC) - timedelta(hours=DRIFT_HOURS)
    with conn.transaction():
        # The planner cannot estimate how many rows pass the eligibility test and tends to sort
        # the whole table; walking the index in claim order is always right here (0.3 ms
        # instead of 350 ms on 50k rows, measured). And a claim is a few index probes; compiling
        # it (JIT, when the many partitions raise its cost estimate) took 190 ms of 215 (the
        # suspect order over 30 daily partitions, measured). Both for this transaction, at once.
        conn.execute("SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true)")
        locked, expiry, shown = _lock_and_lease(conn, strategy, narrowed, params)
        if not locked and strategy is Strategy.RANDOM and params["start"].year > 1970:
            # Wrap around to the beginning (`count` is within the lease limit already).
            return _from_queue(
                conn=conn, user=user, count=count, strategy=Strategy.OLDEST, lease_seconds=lease_seconds,
                overlap=overlap, overlap_share=overlap_share, filters=filters, mixed_share=mixed_share, drifted=(),
            )  # fmt: skip
        if not expiry:
            return []
        items = [row for row in locked if row[0] in expiry]  # in claim order
        audit(conn, user, "claim", None, items=[str(i) for i in expiry], strategy=strategy.value)
    return [claimed_of(conn, row, expiry[row[0]], shown.get(row[0])) for row in items]


CLAIM_ATTEMPTS = 5  # rounds of locking a claim takes when concurrent claims lease what it locked


def _lock_and_lease(
    conn: psycopg.Connection, strategy: Strategy, narrowed: list[sql.Composable], params: dict[str, Any]
) -> tuple[list[tuple[Any, ...]], dict[uuid.UUID, Any], dict[uuid.UUID, _Proposal]]:
    """Lock candidates and lease those still eligible, again while a concurrent claim leased some
    of them: (every row locked, in claim order; {item: expiry}; the labels blind items show).

    A claim whose statement began just before another committed sees that claim's rows unleased
    once their locks are gone, and locks them; `_lease` then finds them leased. Each new round sees
    those leases and passes over them, so a claim is not answered short (or empty) by a race."""
    wanted = params["count"]
    locked: list[tuple[Any, ...]] = []
    expiry: dict[uuid.UUID, Any] = {}
    shown: dict[uuid.UUID, _Proposal] = {}
    for _ in range(CLAIM_ATTEMPTS):
        params["count"] = wanted - len(expiry)
        found = _lock(conn, strategy, narrowed, params)
        if not found:
            break
        if strategy is Strategy.DISAGREE:
            shown.update(_blind_proposals(conn, found))
        leased = _lease(conn, found, params, shown, strategy)
        locked += found
        expiry.update(leased)
        if len(leased) == len(found) or len(expiry) >= wanted:
            break
    params["count"] = wanted
    return locked, expiry, shown


def _answer(row: tuple[Any, ...]) -> _Proposal:
    return _Proposal(row[4], float(row[5]), tuple(float(x) for x in row[9] or ()))


def claimed_of(
    conn: psycopg.Connection, row: tuple[Any, ...], expires_at: datetime, shown: _Proposal | None
) -> Claimed:
    """A claimed item from its row (id, created, model, version, label, confidence, input, required
    reviews, input type, scores, input's object key); blind, showing `shown`, when given."""
    proposal = shown or _answer(row)
    return Claimed(
        prediction_id=row[0], created_at=row[1], model_name=row[2], model_version=row[3], label=proposal.label,
        confidence=proposal.confidence, input=blobs.read(conn, row[6], row[10]) or b"", expires_at=expires_at,
        required_reviews=int(row[7]), input_type=row[8], scores=proposal.scores, blind=shown is not None,
    )  # fmt: skip


def _blind_proposals(conn: psycopg.Connection, locked: list[tuple[Any, ...]]) -> dict[uuid.UUID, _Proposal]:
    """What each item of a blind claim shows: where a shadow labelled it otherwise than the answer,
    a fair coin picks the shadow's prediction or the answer; elsewhere the answer. The reviewer sees
    one label either way, not whose, and the verdict judges both predictions."""
    rows = conn.execute(
        "SELECT DISTINCT ON (sp.prediction_id) sp.prediction_id, sp.label, sp.confidence, sp.scores"
        " FROM shadow_predictions sp JOIN unnest(%s::timestamptz[], %s::uuid[]) AS u(c, i)"
        " ON sp.created_at = u.c AND sp.prediction_id = u.i ORDER BY sp.prediction_id, sp.ingested_at DESC",
        ([r[1] for r in locked], [r[0] for r in locked]),
    ).fetchall()
    shown = {r[0]: _answer(r) for r in locked}
    for r in rows:
        if r[1] != shown[r[0]].label and secrets.randbelow(2):
            shown[r[0]] = _Proposal(r[1], float(r[2]), tuple(float(x) for x in r[3]))
    return shown


def _held(conn: psycopg.Connection, user: User, max_leases: int) -> int:
    """The user's live leases; `Conflict` when they are `max_leases` already."""
    row = conn.execute("SELECT count(*) FROM leases WHERE user_id = %s AND expires_at > now()", (user.id,)).fetchone()
    held = int(row[0]) if row else 0
    if held >= max_leases:
        raise Conflict(
            f"you hold {held} live leases, the most one reviewer may; give verdicts or let them expire first"
        )
    return held


def _random_start(conn: psycopg.Connection) -> datetime | None:
    """A random time between the first prediction and the last; None when there is none."""
    bounds = conn.execute("SELECT min(created_at), max(created_at) FROM predictions").fetchone()
    if not bounds or bounds[0] is None:
        return None
    start: datetime = bounds[0] + (bounds[1] - bounds[0]) * secrets.randbelow(10_000) / 10_000
    return start


def _lock(
    conn: psycopg.Connection, strategy: Strategy, narrowed: list[sql.Composable], params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """Lock candidates, in claim order. SKIP LOCKED: rows another claimer is taking are passed over."""
    order = {
        Strategy.OLDEST: sql.SQL("p.created_at, p.id"),
        Strategy.LEAST_CONFIDENT: sql.SQL("p.confidence, p.created_at, p.id"),
        Strategy.RANDOM: sql.SQL("p.created_at, p.id"),
        Strategy.DISAGREE: _DISAGREEMENTS_FIRST,
        Strategy.DRIFT: _DRIFTED_FIRST,
        Strategy.VALIDATION: sql.SQL("p.created_at, p.id"),
        Strategy.SUSPECT: sql.SQL("x.rank, p.created_at, p.id"),
    }[strategy]
    narrow = sql.SQL("").join(sql.SQL(" AND {}").format(c) for c in narrowed)
    # The suspect order walks the ranking, a few thousand rows, instead of the whole log.
    source = _FROM_SUSPECTS if strategy is Strategy.SUSPECT else sql.SQL("predictions p")
    return conn.execute(
        sql.SQL(
            "SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.input,"
            " {required}, p.input_type, p.scores, p.input_key FROM {source} LEFT JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id"
            " WHERE p.created_at >= %(start)s AND {eligible}{narrow} ORDER BY {order} LIMIT %(count)s"
            " FOR UPDATE OF p SKIP LOCKED"
        ).format(source=source, eligible=_eligible(strategy), narrow=narrow, order=order, required=REQUIRED_REVIEWS),
        params,
    ).fetchall()


def _eligible(strategy: Strategy) -> sql.Composable:
    return _SUSPECT_ELIGIBLE if strategy is Strategy.SUSPECT else _ELIGIBLE


def _lease(
    conn: psycopg.Connection,
    locked: list[tuple[Any, ...]],
    params: dict[str, Any],
    shown: dict[uuid.UUID, _Proposal],
    strategy: Strategy,
) -> dict[uuid.UUID, Any]:
    """Lease the locked rows that are still eligible, each with the label it shows when that is not
    the answer's (`shown`); {item: expiry}.

    Checked again under the locks with a fresh snapshot: a claimer that held one of these rows a
    moment ago has committed by now, and its lease is visible to this statement."""
    params["ids"] = [r[0] for r in locked]
    params["created"] = [r[1] for r in locked]
    params["proposed"] = [shown[r[0]].label if r[0] in shown else None for r in locked]  # None: not blind
    rows = conn.execute(
        sql.SQL(
            """WITH chosen AS (
                SELECT p.id, p.created_at, coalesce(s.required_reviews, {required}) AS required, u.proposed
                FROM unnest(%(created)s::timestamptz[], %(ids)s::uuid[], %(proposed)s::text[]) AS u(c, i, proposed)
                JOIN predictions p ON p.created_at = u.c AND p.id = u.i
                LEFT JOIN review_state s ON s.item_created_at = p.created_at AND s.prediction_id = p.id
                WHERE {eligible}
            ), state AS (
                INSERT INTO review_state (prediction_id, item_created_at, required_reviews)
                SELECT id, created_at, required FROM chosen ON CONFLICT (prediction_id) DO NOTHING
            )
            INSERT INTO leases (prediction_id, user_id, expires_at, proposed)
            SELECT id, %(user)s, now() + make_interval(secs => %(seconds)s), proposed FROM chosen
            ON CONFLICT (prediction_id, user_id) DO UPDATE SET expires_at = EXCLUDED.expires_at,
                proposed = EXCLUDED.proposed, leased_at = now()
            RETURNING prediction_id, expires_at"""
        ).format(required=REQUIRED_REVIEWS, eligible=_eligible(strategy)),
        params,
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def lease_again(
    conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, lease_seconds: float, proposed: str | None = None
) -> Claimed:
    """Lease an item to `user` again (after an undo), whatever its state, showing what it showed
    before: `proposed`, the label shown in a blind review (the answer's or a shadow's); None: not blind."""
    created = uuid_created_at(prediction_id)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO leases (prediction_id, user_id, expires_at, proposed)"
            " VALUES (%s, %s, now() + make_interval(secs => %s), %s) ON CONFLICT (prediction_id, user_id)"
            " DO UPDATE SET expires_at = EXCLUDED.expires_at, proposed = EXCLUDED.proposed, leased_at = now()"
            " RETURNING expires_at",
            (prediction_id, user.id, lease_seconds, proposed),
        ).fetchone()
        item = conn.execute(
            "SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.input,"
            " s.required_reviews, p.input_type, p.scores, p.input_key FROM predictions p JOIN review_state s"
            " ON s.prediction_id = p.id WHERE p.created_at = %s AND p.id = %s",
            (created, prediction_id),
        ).fetchone()
        assert row is not None and item is not None
        shown = None if proposed is None else _answer(item)
        if proposed is not None and proposed != item[4]:
            found = conn.execute(
                "SELECT label, confidence, scores FROM shadow_predictions WHERE created_at = %s"
                " AND prediction_id = %s AND label = %s ORDER BY ingested_at DESC LIMIT 1",
                (created, prediction_id, proposed),
            ).fetchone()
            if found is not None:
                shown = _Proposal(found[0], float(found[1]), tuple(float(x) for x in found[2]))
    return claimed_of(conn, item, row[0], shown)
