"""The audit log: every write of the review loop appends a row in the same transaction; admins read it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

if TYPE_CHECKING:
    from feedback.review.users import User


def audit(conn: psycopg.Connection, actor: User | None, action: str, target: str | None, **details: Any) -> None:
    conn.execute(
        "INSERT INTO audit_log (actor_id, action, target, details) VALUES (%s, %s, %s, %s)",
        (actor.id if actor else None, action, target, Jsonb(details)),
    )


def audit_log(*, conn: psycopg.Connection, limit: int, before: int | None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT l.id, l.at, u.name AS actor, l.action, l.target, l.details FROM audit_log l"
            " LEFT JOIN users u ON u.id = l.actor_id WHERE (%(before)s::bigint IS NULL OR l.id < %(before)s)"
            " ORDER BY l.id DESC LIMIT %(limit)s",
            {"before": before, "limit": limit},
        ).fetchall()
