"""Which items a reviewer's queue or an admin's listing takes: one filter, one translation to SQL.

Clauses name `p` (predictions) and `s` (review_state, joined on the item) and bind their values
by name; nothing from the filter is ever spliced into the statement's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from psycopg import sql

from feedback.review.moderation import Status


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


def where(f: ItemFilter) -> tuple[list[sql.Composable], dict[str, Any]]:
    """The clauses (to be joined with AND) and the parameters they bind."""
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
