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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row

from feedback.errors import Conflict, Invalid, NotFound
from feedback.keys import Keys
from feedback.review.audit import audit
from feedback.review.users import User
from models import store

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
    try:
        stored = store.get(f"{model_name}:{model_version}")
    except store.ModelNotFound as exc:
        raise NotFound(str(exc)) from None
    except store.InvalidModelTag as exc:
        raise Invalid(str(exc)) from None
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
