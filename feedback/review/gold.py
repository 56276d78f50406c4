"""Gold items: items whose right label is known (from a validation version's items that are logged
predictions, from disputes an admin resolved, or named by an admin), mixed into reviewers' claims at
a set share, looking like any other item. A reviewer's answer on one is kept apart
(`gold_answers`): it never changes the item's label nor reaches a dataset version, and it measures
the reviewer (`accuracy`)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from feedback.errors import NotFound
from feedback.predictions.records import created_at as uuid_created_at
from feedback.predictions.store import logged
from feedback.review.audit import audit
from feedback.review.users import User


@dataclass(frozen=True)
class GoldItem:
    prediction_id: uuid.UUID
    model_name: str
    label: str
    source: str


def mark(
    *, conn: psycopg.Connection, admin: User, items: Iterable[tuple[uuid.UUID, str]], source: str = "admin"
) -> int:
    """Mark logged predictions as gold with their right labels (again: the label is replaced; an
    item named twice takes its last label), in one statement; how many. `NotFound` names an item
    that is not a logged prediction, and nothing is marked."""
    labels = dict(items)
    ids = list(labels)
    params = {
        "c": [uuid_created_at(i) for i in ids],
        "i": ids,
        "l": list(labels.values()),
        "source": source,
        "admin": admin.id,
    }
    with conn.transaction():
        rows = conn.execute(
            "INSERT INTO gold_items (prediction_id, item_created_at, model_name, label, source, marked_by)"
            " SELECT p.id, p.created_at, p.model_name, u.label, %(source)s, %(admin)s"
            " FROM unnest(%(c)s::timestamptz[], %(i)s::uuid[], %(l)s::text[]) AS u(c, i, label)"
            " JOIN predictions p ON p.created_at = u.c AND p.id = u.i"
            " ON CONFLICT (prediction_id) DO UPDATE SET label = excluded.label, source = excluded.source,"
            " marked_by = excluded.marked_by, marked_at = now() RETURNING prediction_id",
            params,
        ).fetchall()
        missing = set(ids) - {r[0] for r in rows}
        if missing:
            raise NotFound(f"{min(missing)} is not a logged prediction: only those can be gold items")
        audit(conn, admin, "gold", None, marked=len(rows), source=source)
    return len(rows)


def from_disputes(*, conn: psycopg.Connection, model_name: str) -> list[tuple[uuid.UUID, str]]:
    """The items of the model whose dispute an admin resolved, with the label settled."""
    rows = conn.execute(
        "SELECT s.prediction_id, s.label FROM review_state s JOIN predictions p"
        " ON p.created_at = s.item_created_at AND p.id = s.prediction_id"
        " WHERE p.model_name = %s AND s.status = 'reviewed' AND EXISTS (SELECT 1 FROM annotations a"
        " WHERE a.prediction_id = s.prediction_id AND a.verdict = 'resolve')",
        (model_name,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def from_validation(*, conn: psycopg.Connection, model_name: str, version_id: str) -> list[tuple[uuid.UUID, str]]:
    """The logged predictions a validation version of the model holds (its live validation versions'
    items all are), with the version's labels. `NotFound` for a version that is not one of the
    model's validation versions."""
    from feedback.datasets.versions import read_version  # the datasets layer, only for this

    row = conn.execute(
        "SELECT uri FROM dataset_versions WHERE id = %s AND model_name = %s"
        " AND kind IN ('validation', 'live_validation')",
        (version_id, model_name),
    ).fetchone()
    if row is None:
        raise NotFound(f"{version_id} is not a validation version of {model_name}")
    loaded = read_version(row[0])
    present = logged(conn=conn, item_ids=loaded.item_ids)  # items of the original data have no prediction
    return [
        (present[item], label)
        for item, label in zip(loaded.item_ids, loaded.label_names, strict=True)
        if item in present
    ]


def listed(*, conn: psycopg.Connection, model_name: str) -> list[GoldItem]:
    rows = conn.execute(
        "SELECT prediction_id, model_name, label, source FROM gold_items WHERE model_name = %s ORDER BY prediction_id",
        (model_name,),
    ).fetchall()
    return [GoldItem(r[0], r[1], r[2], r[3]) for r in rows]


def draw_count(count: int, share: float) -> int:
    """How many of a claim of `count` are gold: each place is, with chance `share`."""
    return sum(secrets.randbelow(1_000_000) < share * 1_000_000 for _ in range(count))


def lease(
    conn: psycopg.Connection, user: User, *, count: int, lease_seconds: float, model_name: str | None
) -> list[tuple[Any, ...]]:
    """Lease up to `count` gold items the user never answered (of `model_name`, if given), at random:
    their prediction rows, as the queue reads them, and expiry."""
    if count <= 0:
        return []
    return conn.execute(
        "WITH chosen AS (SELECT g.prediction_id, g.item_created_at FROM gold_items g"
        " WHERE (%(model)s::text IS NULL OR g.model_name = %(model)s)"
        " AND NOT EXISTS (SELECT 1 FROM gold_answers a"
        " WHERE a.prediction_id = g.prediction_id AND a.user_id = %(user)s)"
        " ORDER BY random() LIMIT %(count)s), leased AS ("
        " INSERT INTO gold_leases (prediction_id, user_id, expires_at) SELECT prediction_id, %(user)s,"
        " now() + make_interval(secs => %(seconds)s) FROM chosen ON CONFLICT (prediction_id, user_id)"
        " DO UPDATE SET expires_at = excluded.expires_at, leased_at = now() RETURNING prediction_id, expires_at)"
        " SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.input,"
        " 1, p.input_type, p.scores, p.input_key, l.expires_at"
        " FROM leased l JOIN chosen c ON c.prediction_id = l.prediction_id"
        " JOIN predictions p ON p.created_at = c.item_created_at AND p.id = c.prediction_id",
        {"model": model_name, "user": user.id, "count": count, "seconds": lease_seconds},
    ).fetchall()


def held(conn: psycopg.Connection, user: User, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of `ids` the user holds as gold items now."""
    rows = conn.execute(
        "SELECT prediction_id FROM gold_leases WHERE user_id = %s AND expires_at > now() AND prediction_id = ANY(%s)",
        (user.id, list(ids)),
    ).fetchall()
    return {r[0] for r in rows}


def answer(conn: psycopg.Connection, user: User, verdicts: Sequence[tuple[uuid.UUID, str, str | None]]) -> None:
    """Keep the user's verdicts (item, verdict, label for 'wrong') on gold items they hold, each
    scored against the gold label; the leases are consumed. Nothing about the items changes."""
    for item, verdict, label in verdicts:
        row = conn.execute(
            "DELETE FROM gold_leases WHERE user_id = %s AND prediction_id = %s"
            " RETURNING extract(epoch FROM clock_timestamp() - leased_at)",
            (user.id, item),
        ).fetchone()
        said = label if verdict == "wrong" else None
        if verdict == "correct":
            said = conn.execute(
                "SELECT p.label FROM predictions p WHERE p.created_at = %s AND p.id = %s", (uuid_created_at(item), item)
            ).fetchone()[0]  # type: ignore[index]
        conn.execute(
            "INSERT INTO gold_answers (prediction_id, user_id, verdict, label, correct, seconds)"
            " SELECT %(item)s, %(user)s, %(verdict)s, %(said)s,"
            " CASE WHEN %(verdict)s = 'unsure' THEN NULL WHEN %(said)s::text IS NULL THEN false"
            " ELSE %(said)s = g.label END, %(seconds)s FROM gold_items g WHERE g.prediction_id = %(item)s",
            {
                "item": item,
                "user": user.id,
                "verdict": verdict,
                "said": said,
                "seconds": None if row is None else row[0],
            },
        )


def undo(conn: psycopg.Connection, user: User, item: uuid.UUID, lease_seconds: float) -> bool:
    """Withdraw the user's latest answer on a gold item, if it is theirs and recent, and lease the
    item to them again; False when there is none to withdraw."""
    last = conn.execute(
        "SELECT verdict, at > now() - make_interval(secs => %s) FROM gold_answers"
        " WHERE user_id = %s AND prediction_id = %s ORDER BY id DESC LIMIT 1",
        (lease_seconds, user.id, item),
    ).fetchone()
    if last is None or last[0] == "undo" or not last[1]:
        return False
    conn.execute("INSERT INTO gold_answers (prediction_id, user_id, verdict) VALUES (%s, %s, 'undo')", (item, user.id))
    conn.execute(
        "INSERT INTO gold_leases (prediction_id, user_id, expires_at)"
        " VALUES (%s, %s, now() + make_interval(secs => %s))"
        " ON CONFLICT (prediction_id, user_id) DO UPDATE SET expires_at = excluded.expires_at, leased_at = now()",
        (item, user.id, lease_seconds),
    )
    return True


def accuracy(conn: psycopg.Connection) -> dict[int, tuple[int, int]]:
    """(right, scored) per user id over each user's latest, not withdrawn, scored answer per gold item."""
    rows = conn.execute(
        "SELECT user_id, count(*) FILTER (WHERE correct), count(*) FROM ("
        " SELECT DISTINCT ON (user_id, prediction_id) user_id, verdict, correct FROM gold_answers"
        " ORDER BY user_id, prediction_id, id DESC) latest WHERE verdict <> 'undo' AND correct IS NOT NULL"
        " GROUP BY user_id"
    ).fetchall()
    return {int(r[0]): (int(r[1]), int(r[2])) for r in rows}
