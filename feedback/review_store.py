"""All SQL of moderation: users, leases, verdicts, items, counts, agreement data and the audit log.

Functions take a connection and keyword arguments; queries are parameterised, always. Every
write also appends to the audit log, in the same transaction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from feedback.ids import uuid7
from feedback.moderation import REVIEWER_VERDICTS, Annotation, Status, Verdict, decide, verdict_problem
from feedback.records import created_at as uuid_created_at


class Role(StrEnum):
    REVIEWER = "reviewer"  # claims items and gives verdicts
    ADMIN = "admin"  # also resolves disputes, erases inputs, reads the audit log, manages users


class Strategy(StrEnum):
    OLDEST = "oldest"  # first in, first reviewed
    LEAST_CONFIDENT = "least_confident"  # where the model is least sure: most to learn
    RANDOM = "random"  # a random place in time, then onwards: an unbiased sample


class Conflict(Exception):
    """The request contradicts the current state (e.g. a verdict without a live lease)."""


class NotFound(Exception):
    """No such item."""


class Invalid(ValueError):
    """A verdict, label or filter that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: Role


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def audit(conn: psycopg.Connection, actor: User | None, action: str, target: str | None, **details: Any) -> None:
    conn.execute(
        "INSERT INTO audit_log (actor_id, action, target, details) VALUES (%s, %s, %s, %s)",
        (actor.id if actor else None, action, target, Jsonb(details)),
    )


# -- users --------------------------------------------------------------------------------------


_USER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")


def user_name(raw: str) -> str:
    """The canonical form of a user name, or `Invalid` saying why there is none.

    Names appear in histories and agreement reports, so two must never look alike: the name is
    NFKC-normalised (fullwidth and other compatibility forms become plain letters) and
    lower-cased, then must be 1 to 64 ASCII letters, digits, '.', '_' or '-', starting and
    ending with a letter or digit.
    """
    name = _folded(raw)
    if not _USER_NAME.fullmatch(name):
        raise Invalid(
            f"user name {raw!r} is not allowed: use 1 to 64 letters a-z, digits, '.', '_' or '-',"
            " starting and ending with a letter or digit"
        )
    return name


def _folded(raw: str) -> str:
    return unicodedata.normalize("NFKC", raw).strip().lower()


def create_user(*, conn: psycopg.Connection, name: str, role: Role, actor: User | None = None) -> tuple[User, str]:
    """Create a user under the canonical form of `name` (see `user_name`); returns it with its
    token, which is shown this once and never stored."""
    name = user_name(name)
    token = secrets.token_urlsafe(32)
    with conn.transaction():
        try:
            row = conn.execute(
                "INSERT INTO users (name, role, token_hash) VALUES (%s, %s, %s) RETURNING id",
                (name, role.value, hash_token(token)),
            ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"a user named {name!r} exists") from None
        except psycopg.errors.CheckViolation:
            raise Invalid("a user name has 1 to 64 characters") from None
        assert row is not None
        user = User(id=int(row[0]), name=name, role=role)
        audit(conn, actor, "user.create", name, role=role.value)
    return user, token


def authenticate(*, conn: psycopg.Connection, token: str) -> User | None:
    row = conn.execute("SELECT id, name, role FROM users WHERE token_hash = %s", (hash_token(token),)).fetchone()
    return None if row is None else User(id=int(row[0]), name=row[1], role=Role(row[2]))


def get_user(*, conn: psycopg.Connection, name: str) -> User | None:
    row = conn.execute("SELECT id, name, role FROM users WHERE name = %s", (_folded(name),)).fetchone()
    return None if row is None else User(id=int(row[0]), name=row[1], role=Role(row[2]))


def list_users(*, conn: psycopg.Connection) -> list[User]:
    rows = conn.execute("SELECT id, name, role FROM users ORDER BY id").fetchall()
    return [User(id=int(r[0]), name=r[1], role=Role(r[2])) for r in rows]


# -- claiming -------------------------------------------------------------------------------------

# How many reviews an item needs: `overlap` for a deterministic share of items (by id), else 1.
_REQUIRED = sql.SQL(
    "CASE WHEN ('x' || substr(md5(p.id::text), 1, 7))::bit(28)::int %% 10000 < %(overlap_per_10k)s"
    " THEN %(overlap)s ELSE 1 END"
)
_LIVE_LEASES = sql.SQL("(SELECT count(*) FROM leases l WHERE l.prediction_id = p.id AND l.expires_at > now())")
_ELIGIBLE = sql.SQL(
    """p.source = 'model' AND p.input IS NOT NULL
    AND (s.status IS NULL OR s.status = 'unreviewed')
    AND NOT EXISTS (SELECT 1 FROM annotations a WHERE a.prediction_id = p.id AND a.actor_id = %(user)s)
    AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.prediction_id = p.id AND l.user_id = %(user)s
                    AND l.expires_at > now())
    AND coalesce(s.reviewers, 0) + {live} < coalesce(s.required_reviews, {required})"""
).format(live=_LIVE_LEASES, required=_REQUIRED)


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
    scores: tuple[float, ...] = ()  # the model's probabilities, in its class order


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
) -> list[Claimed]:
    """Lease up to `count` items to `user`; no item is leased to more reviewers than it needs.

    `filters` narrows the queue (date range, model, version, the model's label, confidence range).
    With `max_leases`, the user's live leases stay within it: fewer items are leased when the limit
    is near, and `Conflict` says so when it is reached."""
    if max_leases is not None:
        row = conn.execute(
            "SELECT count(*) FROM leases WHERE user_id = %s AND expires_at > now()", (user.id,)
        ).fetchone()
        held = int(row[0]) if row else 0
        if held >= max_leases:
            raise Conflict(
                f"you hold {held} live leases, the most one reviewer may; give verdicts or let them expire first"
            )
        count = min(count, max_leases - held)
    order = {
        Strategy.OLDEST: sql.SQL("p.created_at, p.id"),
        Strategy.LEAST_CONFIDENT: sql.SQL("p.confidence, p.created_at, p.id"),
        Strategy.RANDOM: sql.SQL("p.created_at, p.id"),
    }[strategy]
    params: dict[str, Any] = {
        "user": user.id,
        "count": count,
        "overlap": overlap,
        "overlap_per_10k": round(overlap_share * 10000),
        "seconds": lease_seconds,
        "start": datetime(1970, 1, 1, tzinfo=UTC),
    }
    narrowed, filter_params = _where(filters or ItemFilter())
    params.update(filter_params)
    narrow = sql.SQL("").join(sql.SQL(" AND {}").format(c) for c in narrowed)
    if strategy is Strategy.RANDOM:
        bounds = conn.execute("SELECT min(created_at), max(created_at) FROM predictions").fetchone()
        if bounds and bounds[0] is not None:
            span = (bounds[1] - bounds[0]) * secrets.randbelow(10_000) / 10_000
            params["start"] = bounds[0] + span
    with conn.transaction():
        # The planner cannot estimate how many rows pass the eligibility test and tends to sort
        # the whole table; walking the index in claim order is always right here (0.3 ms
        # instead of 350 ms on 50k rows, measured).
        conn.execute("SET LOCAL enable_sort = off")
        # 1. Lock candidates. SKIP LOCKED: rows another claimer is taking are passed over.
        locked = conn.execute(
            sql.SQL(
                "SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.input,"
                " {required}, p.input_type, p.scores FROM predictions p LEFT JOIN review_state s"
                " ON s.item_created_at = p.created_at AND s.prediction_id = p.id"
                " WHERE p.created_at >= %(start)s AND {eligible}{narrow} ORDER BY {order} LIMIT %(count)s"
                " FOR UPDATE OF p SKIP LOCKED"
            ).format(eligible=_ELIGIBLE, narrow=narrow, order=order, required=_REQUIRED),
            params,
        ).fetchall()
        if not locked and strategy is Strategy.RANDOM and params["start"].year > 1970:
            params["start"] = datetime(1970, 1, 1, tzinfo=UTC)  # wrap around to the beginning
            return claim(
                conn=conn, user=user, count=count, strategy=Strategy.OLDEST, lease_seconds=lease_seconds,
                overlap=overlap, overlap_share=overlap_share, filters=filters,
            )  # fmt: skip  # `count` is within the lease limit already
        if not locked:
            return []
        # 2. Re-check under the locks with a fresh snapshot: a claimer that held one of these rows
        # a moment ago has committed by now, and its lease is visible to this statement.
        params["ids"] = [r[0] for r in locked]
        params["created"] = [r[1] for r in locked]
        rows = conn.execute(
            sql.SQL(
                """WITH chosen AS (
                    SELECT p.id, p.created_at, coalesce(s.required_reviews, {required}) AS required
                    FROM predictions p LEFT JOIN review_state s
                        ON s.item_created_at = p.created_at AND s.prediction_id = p.id
                    WHERE (p.created_at, p.id) IN (SELECT * FROM unnest(%(created)s::timestamptz[], %(ids)s::uuid[]))
                      AND {eligible}
                ), state AS (
                    INSERT INTO review_state (prediction_id, item_created_at, required_reviews)
                    SELECT id, created_at, required FROM chosen ON CONFLICT (prediction_id) DO NOTHING
                )
                INSERT INTO leases (prediction_id, user_id, expires_at)
                SELECT id, %(user)s, now() + make_interval(secs => %(seconds)s) FROM chosen
                ON CONFLICT (prediction_id, user_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
                RETURNING prediction_id, expires_at"""
            ).format(required=_REQUIRED, eligible=_ELIGIBLE),
            params,
        ).fetchall()
        expiry = {r[0]: r[1] for r in rows}
        if not expiry:
            return []
        items = [row for row in locked if row[0] in expiry]  # in claim order
        audit(conn, user, "claim", None, items=[str(i) for i in expiry], strategy=strategy.value)
    return [
        Claimed(
            prediction_id=row[0], created_at=row[1], model_name=row[2], model_version=row[3], label=row[4],
            confidence=float(row[5]), input=row[6], expires_at=expiry[row[0]], required_reviews=int(row[7]),
            input_type=row[8], scores=tuple(float(x) for x in row[9] or ()),
        )
        for row in items
    ]  # fmt: skip


# -- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictIn:
    prediction_id: uuid.UUID
    verdict: Verdict
    label: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ItemState:
    prediction_id: uuid.UUID
    status: Status
    label: str | None
    revision: int


def _refresh_state(conn: psycopg.Connection, prediction_id: uuid.UUID) -> ItemState:
    """Recompute an item's state from its whole annotation history (the only way it changes)."""
    return _refresh_states(conn, [prediction_id])[0]


def _refresh_states(conn: psycopg.Connection, ids: Sequence[uuid.UUID]) -> list[ItemState]:
    """Recompute the states of several items, in three statements whatever their number."""
    keys = {"ids": list(ids), "created": [uuid_created_at(i) for i in ids], "overlap": 1, "overlap_per_10k": 0}
    items = {
        r[0]: r[1:]
        for r in conn.execute(
            sql.SQL(
                "SELECT p.id, p.label, p.created_at, coalesce(s.required_reviews, {required})"
                " FROM predictions p LEFT JOIN review_state s"
                " ON s.item_created_at = p.created_at AND s.prediction_id = p.id"
                " WHERE (p.created_at, p.id) IN (SELECT * FROM unnest(%(created)s::timestamptz[], %(ids)s::uuid[]))"
            ).format(required=_REQUIRED),
            keys,
        )
    }
    missing = [str(i) for i in ids if i not in items]
    if missing:
        raise NotFound(f"no item {', '.join(missing)}")
    histories: dict[uuid.UUID, list[Annotation]] = {i: [] for i in ids}
    for r in conn.execute(
        "SELECT prediction_id, id, actor_id, verdict, label FROM annotations WHERE prediction_id = ANY(%s) ORDER BY id",
        (list(ids),),
    ):
        histories[r[0]].append(Annotation(revision=r[1], actor_id=r[2], verdict=Verdict(r[3]), label=r[4]))
    states, rows = [], []
    for i in ids:
        predicted, item_created, required = items[i]
        decision = decide(histories[i], predicted=predicted, required=int(required))
        revision = histories[i][-1].revision if histories[i] else 0
        states.append(ItemState(i, decision.status, decision.label, revision))
        rows.append(
            (i, item_created, int(required), decision.status.value, decision.label, revision, decision.reviewers)
        )
    with conn.cursor() as cursor:
        cursor.executemany(
            """INSERT INTO review_state (prediction_id, item_created_at, required_reviews, status, label, revision,
                                         reviewers)
               VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (prediction_id) DO UPDATE SET status = EXCLUDED.status, label = EXCLUDED.label,
                   revision = EXCLUDED.revision, reviewers = EXCLUDED.reviewers""",
            rows,
        )
    return states


def _annotate(
    conn: psycopg.Connection,
    user: User,
    prediction_id: uuid.UUID,
    *,
    verdict: Verdict,
    label: str | None,
    reason: str | None,
) -> int:
    row = conn.execute(
        "INSERT INTO annotations (prediction_id, item_created_at, actor_id, verdict, label, reason)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (prediction_id, uuid_created_at(prediction_id), user.id, verdict.value, label, reason),
    ).fetchone()
    assert row is not None
    return int(row[0])


def record_verdicts(
    *,
    conn: psycopg.Connection,
    user: User,
    verdicts: Sequence[VerdictIn],
    labels_of: Callable[[str], Sequence[str] | None] | None = None,
) -> list[ItemState]:
    """Record verdicts on items the user holds, all or none. A verdict consumes its lease.

    `labels_of` gives a model's class names by model name: a corrected label must be one of the
    item's model (a model it does not know is not checked), and not the one the model predicted."""
    for v in verdicts:
        if v.verdict not in (Verdict.CORRECT, Verdict.WRONG, Verdict.DISCARD, Verdict.UNSURE):
            raise Invalid(f"{v.verdict.value!r} is not a reviewer's verdict")
        if v.verdict is Verdict.WRONG and not v.label:
            raise Invalid(f"{v.prediction_id}: 'wrong' needs the right label")
        if v.verdict is not Verdict.WRONG and v.label is not None:
            raise Invalid(f"{v.prediction_id}: only 'wrong' takes a label")
        if v.verdict is Verdict.DISCARD and not v.reason:
            raise Invalid(f"{v.prediction_id}: 'discard' needs a reason")
    ids = [v.prediction_id for v in verdicts]
    labelled = [v for v in verdicts if v.label is not None]
    if labelled:
        items: dict[uuid.UUID, tuple[str, str]] = {
            r[0]: (r[1], r[2])
            for r in conn.execute(
                "SELECT id, model_name, label FROM predictions WHERE id = ANY(%s)",
                ([v.prediction_id for v in labelled],),
            )
        }
        for v in labelled:
            if v.prediction_id not in items:
                continue  # no such item: the lease check below refuses it
            model_name, predicted = items[v.prediction_id]
            labels = labels_of(model_name) if labels_of is not None else None
            if labels is not None and v.label not in labels:
                raise Invalid(f"{v.prediction_id}: unknown label {v.label!r}; labels are {', '.join(labels)}")
            problem = verdict_problem(v.verdict, v.label, predicted=predicted)
            if problem is not None:
                raise Invalid(f"{v.prediction_id}: {problem}")
    if len(set(ids)) != len(ids):
        raise Invalid("an item appears twice in one call")
    with conn.transaction():
        held = {
            r[0]
            for r in conn.execute(
                "DELETE FROM leases WHERE user_id = %s AND expires_at > now() AND prediction_id = ANY(%s)"
                " RETURNING prediction_id",
                (user.id, ids),
            )
        }
        not_held = [str(i) for i in ids if i not in held]
        if not_held:
            raise Conflict(f"you hold no live lease on {', '.join(not_held)} (claim first)")
        conn.execute(
            "INSERT INTO annotations (prediction_id, item_created_at, actor_id, verdict, label, reason)"
            " SELECT i, c, %s, v, l, r FROM unnest(%s::uuid[], %s::timestamptz[], %s::text[], %s::text[], %s::text[])"
            " AS u(i, c, v, l, r)",
            (
                user.id,
                ids,
                [uuid_created_at(i) for i in ids],
                [v.verdict.value for v in verdicts],
                [v.label for v in verdicts],
                [v.reason for v in verdicts],
            ),
        )
        states = _refresh_states(conn, ids)
        audit(conn, user, "verdicts", None, items=[str(i) for i in ids])
    return states


def undo(*, conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, lease_seconds: float) -> Claimed:
    """Take back the user's own latest verdict on an item, while the lease it consumed would still be
    live and nobody has annotated the item since. An `undo` revision withdraws the reviewer's
    opinion; the item is leased to them again, to judge anew."""
    created = uuid_created_at(prediction_id)
    with conn.transaction():
        found = conn.execute(
            "SELECT id FROM predictions WHERE created_at = %s AND id = %s FOR UPDATE", (created, prediction_id)
        ).fetchone()
        if found is None:
            raise NotFound(f"no item {prediction_id}")
        last = conn.execute(
            "SELECT actor_id, verdict, at > now() - make_interval(secs => %s) FROM annotations"
            " WHERE prediction_id = %s ORDER BY id DESC LIMIT 1",
            (lease_seconds, prediction_id),
        ).fetchone()
        if last is None or last[0] != user.id or Verdict(last[1]) not in REVIEWER_VERDICTS:
            raise Conflict(f"{prediction_id}: the item's latest revision is not a verdict of yours; nothing to undo")
        if not last[2]:
            raise Conflict(
                f"{prediction_id}: the verdict is older than its lease ({lease_seconds:g} s); too late to undo"
            )
        _annotate(conn, user, prediction_id, verdict=Verdict.UNDO, label=None, reason="undone by the reviewer")
        _refresh_state(conn, prediction_id)
        audit(conn, user, "undo", str(prediction_id))
    (again,) = _lease_again(conn, user, prediction_id, lease_seconds)
    return again


def _lease_again(conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, lease_seconds: float) -> list[Claimed]:
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO leases (prediction_id, user_id, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (prediction_id, user_id) DO UPDATE SET expires_at = EXCLUDED.expires_at RETURNING expires_at",
            (prediction_id, user.id, lease_seconds),
        ).fetchone()
        item = conn.execute(
            "SELECT p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.input, s.required_reviews,"
            " p.input_type, p.scores FROM predictions p JOIN review_state s ON s.prediction_id = p.id"
            " WHERE p.created_at = %s AND p.id = %s",
            (uuid_created_at(prediction_id), prediction_id),
        ).fetchone()
    assert row is not None and item is not None
    return [
        Claimed(
            prediction_id=prediction_id, created_at=item[0], model_name=item[1], model_version=item[2],
            label=item[3], confidence=float(item[4]), input=item[5], expires_at=row[0], required_reviews=int(item[6]),
            input_type=item[7], scores=tuple(float(x) for x in item[8] or ()),
        )
    ]  # fmt: skip


def add_sample(
    *,
    conn: psycopg.Connection,
    user: User,
    model_name: str,
    input: bytes,
    label: str,
    reason: str | None,
    input_type: str | None = None,
) -> ItemState:
    """A sample `model_name` missed, with its label: enters the pool as a reviewed item.

    `input` is .npy bytes, or an image as sent when `input_type` is its media type."""
    prediction_id = uuid7()
    with conn.transaction():
        conn.execute(
            "INSERT INTO predictions (id, created_at, model_name, model_version, label, label_index, confidence,"
            " scores, input, input_type, request_id, source) VALUES (%s, %s, %s, 'added', %s, -1, 1.0, '{}', %s, %s,"
            " %s, 'reviewer')",
            (prediction_id, uuid_created_at(prediction_id), model_name, label, input, input_type,
             f"added-by-{user.name}"),
        )  # fmt: skip
        _annotate(conn, user, prediction_id, verdict=Verdict.ADDED, label=label, reason=reason)
        state = _refresh_state(conn, prediction_id)
        audit(conn, user, "sample.add", str(prediction_id), label=label)
    return state


def resolve(
    *, conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, label: str | None, reason: str
) -> ItemState:
    """An admin settles an item: `label`, or discard when it is None. Recorded as a revision."""
    with conn.transaction():
        _exists(conn, prediction_id)
        _annotate(conn, user, prediction_id, verdict=Verdict.RESOLVE, label=label, reason=reason)
        state = _refresh_state(conn, prediction_id)
        audit(conn, user, "resolve", str(prediction_id), label=label, reason=reason)
    return state


def erase_input(*, conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, reason: str) -> None:
    """Erase an item's input for a data-removal request; the audit row of the erasure remains."""
    with conn.transaction():
        _exists(conn, prediction_id)
        conn.execute(
            "UPDATE predictions SET input = NULL WHERE created_at = %s AND id = %s",
            (uuid_created_at(prediction_id), prediction_id),
        )
        _annotate(conn, user, prediction_id, verdict=Verdict.ERASE, label=None, reason=reason)
        audit(conn, user, "input.erase", str(prediction_id), reason=reason)


def _exists(conn: psycopg.Connection, prediction_id: uuid.UUID) -> None:
    found = conn.execute(
        "SELECT 1 FROM predictions WHERE created_at = %s AND id = %s",
        (uuid_created_at(prediction_id), prediction_id),
    ).fetchone()
    if found is None:
        raise NotFound(f"no item {prediction_id}")


def history(*, conn: psycopg.Connection, prediction_id: uuid.UUID) -> list[dict[str, Any]]:
    _exists(conn, prediction_id)
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT a.id AS revision, a.verdict, a.label, a.reason, a.at, u.name AS actor"
            " FROM annotations a JOIN users u ON u.id = a.actor_id WHERE a.prediction_id = %s ORDER BY a.id",
            (prediction_id,),
        ).fetchall()


# -- reading --------------------------------------------------------------------------------------


class SortKey(StrEnum):
    TIME = "time"
    CONFIDENCE = "confidence"


@dataclass(frozen=True)
class ItemFilter:
    created_from: datetime | None = None
    created_to: datetime | None = None
    model_name: str | None = None
    model_version: str | None = None
    label: str | None = None  # the model's label
    reviewed_label: str | None = None  # the current label
    min_confidence: float | None = None
    max_confidence: float | None = None
    status: Status | None = None
    reviewer: str | None = None  # items this reviewer annotated
    sort: SortKey = SortKey.TIME
    descending: bool = False


@dataclass(frozen=True)
class Item:
    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    confidence: float
    source: str
    status: Status
    reviewed_label: str | None
    revision: int | None
    input_erased: bool


@dataclass(frozen=True)
class Page:
    items: list[Item]
    next_cursor: str | None


def encode_cursor(item: Item, sort: SortKey) -> str:
    key = [item.confidence if sort is SortKey.CONFIDENCE else None, item.created_at.isoformat(), str(item.id)]
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float | None, datetime, uuid.UUID]:
    refused = Invalid("cursor is not one this API gave out")
    try:
        confidence, created, item_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError):  # not base64, not JSON, not three items
        raise refused from None
    # A cursor is client input: check each part's type before using it.
    if not (confidence is None or (type(confidence) in (int, float) and math.isfinite(confidence))):
        raise refused
    if not isinstance(created, str) or not isinstance(item_id, str):
        raise refused
    try:
        when, key = datetime.fromisoformat(created), uuid.UUID(item_id)
    except ValueError:
        raise refused from None
    if when.tzinfo is None:
        raise refused
    return None if confidence is None else float(confidence), when, key


def _where(f: ItemFilter) -> tuple[list[sql.Composable], dict[str, Any]]:
    clauses: list[sql.Composable] = []
    params: dict[str, Any] = {}

    def add(clause: str, name: str, value: Any) -> None:
        clauses.append(sql.SQL(clause))
        params[name] = value

    if f.created_from is not None:
        add("p.created_at >= %(created_from)s", "created_from", f.created_from)
    if f.created_to is not None:
        add("p.created_at < %(created_to)s", "created_to", f.created_to)
    if f.model_name is not None:
        add("p.model_name = %(model_name)s", "model_name", f.model_name)
    if f.model_version is not None:
        add("p.model_version = %(model_version)s", "model_version", f.model_version)
    if f.label is not None:
        add("p.label = %(label)s", "label", f.label)
    if f.reviewed_label is not None:
        add("s.label = %(reviewed_label)s", "reviewed_label", f.reviewed_label)
    if f.min_confidence is not None:
        add("p.confidence >= %(min_confidence)s", "min_confidence", f.min_confidence)
    if f.max_confidence is not None:
        add("p.confidence <= %(max_confidence)s", "max_confidence", f.max_confidence)
    if f.status is Status.UNREVIEWED:
        clauses.append(sql.SQL("(s.status IS NULL OR s.status = 'unreviewed')"))
    elif f.status is not None:  # written so the planner can start from review_state's status index
        add("s.status = %(status)s", "status", f.status.value)
    if f.reviewer is not None:
        # Driven from the reviewer's annotations (few) into the primary key, not the other way.
        add(
            "(p.created_at, p.id) IN (SELECT a.item_created_at, a.prediction_id FROM annotations a"
            " JOIN users u ON u.id = a.actor_id WHERE u.name = %(reviewer)s)",
            "reviewer",
            f.reviewer,
        )
    return clauses, params


def list_items(*, conn: psycopg.Connection, filters: ItemFilter, limit: int, cursor: str | None) -> Page:
    """One page of items matching `filters`, in a stable keyset order (time or confidence, then id)."""
    clauses, params = _where(filters)
    op = sql.SQL("<" if filters.descending else ">")
    if cursor is not None:
        confidence, created, item_id = decode_cursor(cursor)
        params.update(c_created=created, c_id=item_id, c_conf=confidence)
        if filters.sort is SortKey.CONFIDENCE:
            if confidence is None:
                raise Invalid("cursor was made for another sort order")
            clauses.append(
                sql.SQL("(p.confidence, p.created_at, p.id) {} (%(c_conf)s::real, %(c_created)s, %(c_id)s)").format(op)
            )
        else:
            clauses.append(sql.SQL("(p.created_at, p.id) {} (%(c_created)s, %(c_id)s)").format(op))
    direction = sql.SQL("DESC" if filters.descending else "ASC")
    keys = ["p.confidence", "p.created_at", "p.id"] if filters.sort is SortKey.CONFIDENCE else ["p.created_at", "p.id"]
    order = sql.SQL(", ").join(sql.SQL(f"{k} {{}}").format(direction) for k in keys)
    where = sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("TRUE")
    params["limit"] = limit + 1
    rows = conn.execute(
        sql.SQL(
            "SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.source,"
            " coalesce(s.status, 'unreviewed'), s.label, s.revision, p.input IS NULL"
            " FROM predictions p LEFT JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id"
            " WHERE {where} ORDER BY {order} LIMIT %(limit)s"
        ).format(where=where, order=order),
        params,
    ).fetchall()
    items = [
        Item(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6], Status(r[7]), r[8], r[9], bool(r[10]))
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor(items[-1], filters.sort) if more and items else None)


def counts(
    *,
    conn: psycopg.Connection,
    created_from: datetime | None,
    created_to: datetime | None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Moderated and unmoderated per model version and day; verdict breakdown; judged accuracy.
    `model_name` narrows every figure to that model's predictions."""
    f = ItemFilter(created_from=created_from, created_to=created_to, model_name=model_name)
    clauses, params = _where(f)
    clauses.append(sql.SQL("p.source = 'model'"))
    where = sql.SQL(" AND ").join(clauses)
    per_day = conn.execute(
        sql.SQL(
            "SELECT p.model_name, p.model_version, date_trunc('day', p.created_at)::date AS day, count(*),"
            " count(*) FILTER (WHERE coalesce(s.status, 'unreviewed') <> 'unreviewed')"
            " FROM predictions p LEFT JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id WHERE {where}"
            " GROUP BY 1, 2, 3 ORDER BY 3, 1, 2"
        ).format(where=where),
        params,
    ).fetchall()
    breakdown = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE s.status = 'reviewed' AND s.label = p.label),"
            " count(*) FILTER (WHERE s.status = 'reviewed' AND s.label <> p.label),"
            " count(*) FILTER (WHERE s.status = 'discarded'),"
            " count(*) FILTER (WHERE s.status = 'disputed')"
            " FROM predictions p JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id WHERE {where}"
        ).format(where=where),
        params,
    ).fetchone()
    correct, corrected, discarded, disputed = breakdown or (0, 0, 0, 0)
    per_version = conn.execute(
        sql.SQL(
            "SELECT p.model_name, p.model_version, count(*) FILTER (WHERE s.label = p.label),"
            " count(*) FILTER (WHERE s.label <> p.label)"
            " FROM predictions p JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id WHERE {where} AND s.status = 'reviewed'"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ).format(where=where),
        params,
    ).fetchall()
    rows = [
        {
            "model_name": r[0],
            "model_version": r[1],
            "day": r[2].isoformat(),
            "moderated": r[4],
            "unmoderated": r[3] - r[4],
        }
        for r in per_day
    ]
    judged = correct + corrected
    return {
        "moderated": sum(r["moderated"] for r in rows),
        "unmoderated": sum(r["unmoderated"] for r in rows),
        "per_model_day": rows,
        "verdicts": {
            "correct": correct,
            "corrected": corrected,
            "discarded": discarded,
            "disputed": disputed,
        },
        "accuracy_by_reviewers": (correct / judged) if judged else None,
        "per_version": [
            {
                "model_name": r[0],
                "model_version": r[1],
                "correct": r[2],
                "corrected": r[3],
                "accuracy": r[2] / (r[2] + r[3]) if r[2] + r[3] else None,
            }
            for r in per_version
        ],
    }


def opinions(*, conn: psycopg.Connection) -> list[tuple[uuid.UUID, str, str, int, str, str | None, str]]:
    """Every reviewer verdict with its item's predicted label and current status, oldest first:
    (item, predicted label, reviewer name, revision, verdict, label, status)."""
    return [
        (r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6])
        for r in conn.execute(
            "SELECT a.prediction_id, p.label, u.name, a.id, a.verdict, a.label, coalesce(s.status, 'unreviewed')"
            " FROM annotations a JOIN users u ON u.id = a.actor_id"
            " JOIN predictions p ON p.created_at = a.item_created_at AND p.id = a.prediction_id"
            " LEFT JOIN review_state s ON s.prediction_id = a.prediction_id"
            " WHERE a.verdict IN ('correct', 'wrong', 'discard', 'unsure', 'undo') ORDER BY a.id"
        )
    ]


def final_labels(*, conn: psycopg.Connection, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[str, str | None]]:
    rows = conn.execute(
        "SELECT prediction_id, status, label FROM review_state WHERE prediction_id = ANY(%s)", (list(ids),)
    ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def audit_log(*, conn: psycopg.Connection, limit: int, before: int | None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT l.id, l.at, u.name AS actor, l.action, l.target, l.details FROM audit_log l"
            " LEFT JOIN users u ON u.id = l.actor_id WHERE (%(before)s::bigint IS NULL OR l.id < %(before)s)"
            " ORDER BY l.id DESC LIMIT %(limit)s",
            {"before": before, "limit": limit},
        ).fetchall()
