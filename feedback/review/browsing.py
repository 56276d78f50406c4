"""Reading the review loop: pages of items in a stable keyset order, counts per model, version and
day, and the verdicts that agreement figures are computed from.

Functions take a connection and keyword arguments; queries are parameterised, always.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from feedback.errors import Invalid
from feedback.review.filters import ItemFilter, SortKey, where
from feedback.review.moderation import Status


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


def list_items(*, conn: psycopg.Connection, filters: ItemFilter, limit: int, cursor: str | None) -> Page:
    """One page of items matching `filters`, in a stable keyset order (time or confidence, then id)."""
    clauses, params = where(filters)
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
    condition = sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("TRUE")
    params["limit"] = limit + 1
    rows = conn.execute(
        sql.SQL(
            "SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.source,"
            " coalesce(s.status, 'unreviewed'), s.label, s.revision, p.input IS NULL AND p.input_key IS NULL"
            " FROM predictions p LEFT JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id"
            " WHERE {where} ORDER BY {order} LIMIT %(limit)s"
        ).format(where=condition, order=order),
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
    clauses, params = where(f)
    clauses.append(sql.SQL("p.source = 'model'"))
    condition = sql.SQL(" AND ").join(clauses)
    rows = _per_model_day(conn, condition, params)
    correct, corrected, discarded, disputed = _breakdown(conn, condition, params)
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
        "per_version": _per_version(conn, condition, params),
    }


def _per_model_day(conn: psycopg.Connection, condition: sql.Composable, params: dict[str, Any]) -> list[dict[str, Any]]:
    per_day = conn.execute(
        sql.SQL(
            "SELECT p.model_name, p.model_version, date_trunc('day', p.created_at)::date AS day, count(*),"
            " count(*) FILTER (WHERE coalesce(s.status, 'unreviewed') <> 'unreviewed')"
            " FROM predictions p LEFT JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id WHERE {where}"
            " GROUP BY 1, 2, 3 ORDER BY 3, 1, 2"
        ).format(where=condition),
        params,
    ).fetchall()
    return [
        {
            "model_name": r[0],
            "model_version": r[1],
            "day": r[2].isoformat(),
            "moderated": r[4],
            "unmoderated": r[3] - r[4],
        }
        for r in per_day
    ]


def _breakdown(conn: psycopg.Connection, condition: sql.Composable, params: dict[str, Any]) -> tuple[int, ...]:
    """(correct, corrected, discarded, disputed) items."""
    breakdown = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE s.status = 'reviewed' AND s.label = p.label),"
            " count(*) FILTER (WHERE s.status = 'reviewed' AND s.label <> p.label),"
            " count(*) FILTER (WHERE s.status = 'discarded'),"
            " count(*) FILTER (WHERE s.status = 'disputed')"
            " FROM predictions p JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id WHERE {where}"
        ).format(where=condition),
        params,
    ).fetchone()
    return tuple(breakdown) if breakdown else (0, 0, 0, 0)


def _per_version(conn: psycopg.Connection, condition: sql.Composable, params: dict[str, Any]) -> list[dict[str, Any]]:
    per_version = conn.execute(
        sql.SQL(
            "SELECT p.model_name, p.model_version, count(*) FILTER (WHERE s.label = p.label),"
            " count(*) FILTER (WHERE s.label <> p.label)"
            " FROM predictions p JOIN review_state s"
            " ON s.item_created_at = p.created_at AND s.prediction_id = p.id WHERE {where} AND s.status = 'reviewed'"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ).format(where=condition),
        params,
    ).fetchall()
    return [
        {
            "model_name": r[0],
            "model_version": r[1],
            "correct": r[2],
            "corrected": r[3],
            "accuracy": r[2] / (r[2] + r[3]) if r[2] + r[3] else None,
        }
        for r in per_version
    ]


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
