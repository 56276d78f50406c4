"""Verdicts and every other revision of an item's label: a reviewer's verdicts (all or none, each
consuming its lease), taking one back, a sample the model missed, an admin's resolution, an
erased input, and an item's history.

Annotations are only ever appended; an item's state (`review_state`) is recomputed from its whole
history by the moderation rules after each write. Every write also appends to the audit log, in
the same transaction. Functions take a connection and keyword arguments; queries are
parameterised, always.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from feedback.errors import Conflict, Invalid, NotFound
from feedback.ids import uuid7
from feedback.predictions import blobs, partitions
from feedback.predictions.records import created_at as uuid_created_at
from feedback.review import gold
from feedback.review.audit import audit
from feedback.review.moderation import REVIEWER_VERDICTS, Annotation, Status, Verdict, decide, verdict_problem
from feedback.review.queue import REQUIRED_REVIEWS, Claimed, claimed_of, lease_again
from feedback.review.users import User


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


# The version of an item's model's guidelines a verdict is given under (NULL: the model has none).
_GUIDELINES = (
    "(SELECT max(g.version) FROM guidelines g JOIN predictions p ON p.model_name = g.model_name"
    " WHERE p.created_at = {created} AND p.id = {item})"
)


def _current_states(conn: psycopg.Connection, ids: Sequence[uuid.UUID]) -> list[ItemState]:
    """The items' states as they are (read only)."""
    rows = conn.execute(
        "SELECT prediction_id, status, label, revision FROM review_state WHERE prediction_id = ANY(%s)", (list(ids),)
    ).fetchall()
    found = {r[0]: ItemState(r[0], Status(r[1]), r[2], int(r[3] or 0)) for r in rows}
    return [found.get(i, ItemState(i, Status.UNREVIEWED, None, 0)) for i in ids]


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
            ).format(required=REQUIRED_REVIEWS),
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
    created_at = uuid_created_at(prediction_id)
    row = conn.execute(
        "INSERT INTO annotations (prediction_id, item_created_at, actor_id, verdict, label, reason, guidelines_version)"
        f" VALUES (%s, %s, %s, %s, %s, %s, {_GUIDELINES.format(created='%s', item='%s')}) RETURNING id",
        (prediction_id, created_at, user.id, verdict.value, label, reason, created_at, prediction_id),
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
    """Record verdicts on items the user holds, all or none. A verdict consumes its lease, and
    records how long it took from it and the version of its model's guidelines.

    `labels_of` gives a model's class names by model name: a corrected label must be one of the
    item's model (a model it does not know is not checked), and not the one the model predicted."""
    for v in verdicts:
        _check_form(v)
    ids = [v.prediction_id for v in verdicts]
    _check_labels(conn, [v for v in verdicts if v.label is not None], labels_of)
    if len(set(ids)) != len(ids):
        raise Invalid("an item appears twice in one call")
    with conn.transaction():
        golden = gold.held(conn, user, ids)
        if golden:  # answers on gold items are kept apart: the items do not change
            gold.answer(
                conn, user, [(v.prediction_id, v.verdict.value, v.label) for v in verdicts if v.prediction_id in golden]
            )
            verdicts = [v for v in verdicts if v.prediction_id not in golden]
            ids = [v.prediction_id for v in verdicts]
        consumed = conn.execute(
            "DELETE FROM leases WHERE user_id = %s AND expires_at > now() AND prediction_id = ANY(%s)"
            " RETURNING prediction_id, proposed, extract(epoch FROM clock_timestamp() - leased_at)",
            (user.id, ids),
        ).fetchall()
        shown: dict[uuid.UUID, str | None] = {r[0]: r[1] for r in consumed}
        took: dict[uuid.UUID, float] = {r[0]: float(r[2]) for r in consumed}
        not_held = [str(i) for i in ids if i not in shown]
        if not_held:
            raise Conflict(f"you hold no live lease on {', '.join(not_held)} (claim first)")
        _check_against_shown(conn, verdicts, shown)
        conn.execute(
            "INSERT INTO annotations (prediction_id, item_created_at, actor_id, verdict, label, reason, proposed,"
            " guidelines_version, seconds)"
            f" SELECT i, c, %s, v, l, r, s, {_GUIDELINES.format(created='c', item='i')}, t"
            " FROM unnest(%s::uuid[], %s::timestamptz[], %s::text[], %s::text[],"
            " %s::text[], %s::text[], %s::real[]) AS u(i, c, v, l, r, s, t)",
            (
                user.id,
                ids,
                [uuid_created_at(i) for i in ids],
                [v.verdict.value for v in verdicts],
                # 'correct' on a blind item judges the label it was shown: kept as the verdict's label
                [shown[v.prediction_id] if v.verdict is Verdict.CORRECT else v.label for v in verdicts],
                [v.reason for v in verdicts],
                [shown[v.prediction_id] for v in verdicts],
                [took[v.prediction_id] for v in verdicts],
            ),
        )
        states = _refresh_states(conn, ids) if ids else []
        if ids:
            audit(conn, user, "verdicts", None, items=[str(i) for i in ids])
        states += _current_states(conn, list(golden)) if golden else []
    return states


def record_outside(
    *, conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, verdict: Verdict, label: str | None, reason: str
) -> int:
    """A reviewer's verdict given in another tool (no lease to consume: the tool assigned the item),
    or their taking one back (`UNDO`), in the caller's transaction; its revision."""
    if verdict not in (*REVIEWER_VERDICTS, Verdict.UNDO):
        raise Invalid(f"{verdict.value!r} is not a reviewer's verdict")
    _exists(conn, prediction_id)
    revision = _annotate(conn, user, prediction_id, verdict=verdict, label=label, reason=reason)
    _refresh_state(conn, prediction_id)
    audit(conn, user, "verdicts" if verdict is not Verdict.UNDO else "undo", str(prediction_id), reason=reason)
    return revision


def _check_form(v: VerdictIn) -> None:
    """`Invalid` for a verdict a reviewer cannot give, or one without what it needs."""
    if v.verdict not in (Verdict.CORRECT, Verdict.WRONG, Verdict.DISCARD, Verdict.UNSURE):
        raise Invalid(f"{v.verdict.value!r} is not a reviewer's verdict")
    if v.verdict is Verdict.WRONG and not v.label:
        raise Invalid(f"{v.prediction_id}: 'wrong' needs the right label")
    if v.verdict is not Verdict.WRONG and v.label is not None:
        raise Invalid(f"{v.prediction_id}: only 'wrong' takes a label")
    if v.verdict is Verdict.DISCARD and not v.reason:
        raise Invalid(f"{v.prediction_id}: 'discard' needs a reason")


def _check_labels(
    conn: psycopg.Connection,
    labelled: Sequence[VerdictIn],
    labels_of: Callable[[str], Sequence[str] | None] | None,
) -> None:
    """`Invalid` for a corrected label the item's model does not have."""
    if not labelled or labels_of is None:
        return
    models: dict[uuid.UUID, str] = dict(
        conn.execute(
            "SELECT id, model_name FROM predictions WHERE id = ANY(%s)", ([v.prediction_id for v in labelled],)
        ).fetchall()
    )
    for v in labelled:
        if v.prediction_id not in models:
            continue  # no such item: the lease check refuses it
        labels = labels_of(models[v.prediction_id])
        if labels is not None and v.label not in labels:
            raise Invalid(f"{v.prediction_id}: unknown label {v.label!r}; labels are {', '.join(labels)}")


def _check_against_shown(
    conn: psycopg.Connection, verdicts: Sequence[VerdictIn], shown: dict[uuid.UUID, str | None]
) -> None:
    """`Invalid` for a correction to the very label the reviewer was shown (the answer's, or in a
    blind review the one `shown`)."""
    labelled = [v for v in verdicts if v.label is not None]
    if not labelled:
        return
    predicted: dict[uuid.UUID, str] = dict(
        conn.execute(
            "SELECT id, label FROM predictions WHERE id = ANY(%s)", ([v.prediction_id for v in labelled],)
        ).fetchall()
    )
    for v in labelled:
        problem = verdict_problem(v.verdict, v.label, predicted=shown[v.prediction_id] or predicted[v.prediction_id])
        if problem is not None:
            raise Invalid(f"{v.prediction_id}: {problem}")


def undo(*, conn: psycopg.Connection, user: User, prediction_id: uuid.UUID, lease_seconds: float) -> Claimed:
    """Take back the user's own latest verdict on an item, while the lease it consumed would still be
    live and nobody has annotated the item since. An `undo` revision withdraws the reviewer's
    opinion; the item is leased to them again, to judge anew."""
    created = uuid_created_at(prediction_id)
    with conn.transaction():
        if gold.undo(conn, user, prediction_id, lease_seconds):  # an answer on a gold item, withdrawn
            return gold_claimed(conn, user, prediction_id)
        found = conn.execute(
            "SELECT id FROM predictions WHERE created_at = %s AND id = %s FOR UPDATE", (created, prediction_id)
        ).fetchone()
        if found is None:
            raise NotFound(f"no item {prediction_id}")
        last = conn.execute(
            "SELECT actor_id, verdict, at > now() - make_interval(secs => %s), proposed FROM annotations"
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
    return lease_again(conn, user, prediction_id, lease_seconds, proposed=last[3])


def gold_claimed(conn: psycopg.Connection, user: User, prediction_id: uuid.UUID) -> Claimed:
    """A gold item the user holds, as a claim shows it."""
    row = conn.execute(
        "SELECT p.id, p.created_at, p.model_name, p.model_version, p.label, p.confidence, p.input, 1, p.input_type,"
        " p.scores, p.input_key, l.expires_at FROM gold_leases l JOIN gold_items g ON g.prediction_id = l.prediction_id"
        " JOIN predictions p ON p.created_at = g.item_created_at AND p.id = g.prediction_id"
        " WHERE l.user_id = %s AND l.prediction_id = %s",
        (user.id, prediction_id),
    ).fetchone()
    assert row is not None
    return claimed_of(conn, row[:11], row[11], None)


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
    partitions.ensure(conn, partitions.days_of([uuid_created_at(prediction_id)]))
    with conn.transaction():
        conn.execute(
            "INSERT INTO predictions (id, created_at, model_name, model_version, label, label_index, confidence,"
            " scores, input, input_type, request_id, source) VALUES (%s, %s, %s, 'added', %s, -1, 1.0, '{}', %s, %s,"
            " %s, 'reviewer')",
            (
                prediction_id,
                uuid_created_at(prediction_id),
                model_name,
                label,
                input,
                input_type,
                f"added-by-{user.name}",
            ),
        )
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
    """Erase an item's input for a data-removal request; the audit row of the erasure remains. An
    input in the object store goes too, once no other row names the same bytes (after the commit,
    so that a failed erasure loses nothing)."""
    with conn.transaction():
        _exists(conn, prediction_id)
        key = (uuid_created_at(prediction_id), prediction_id)
        row = conn.execute(
            "SELECT input_key FROM predictions WHERE created_at = %s AND id = %s FOR UPDATE", key
        ).fetchone()
        conn.execute("UPDATE predictions SET input = NULL, input_key = NULL WHERE created_at = %s AND id = %s", key)
        _annotate(conn, user, prediction_id, verdict=Verdict.ERASE, label=None, reason=reason)
        audit(conn, user, "input.erase", str(prediction_id), reason=reason)
    if row is not None and row[0] is not None:
        blobs.forget_unreferenced(conn, [row[0]])


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
