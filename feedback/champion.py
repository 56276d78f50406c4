"""Who serves: the champion, the promotion gate, forced promotions, announcements, re-evaluations,
and their SQL (evaluations on validation versions, and every promotion decision with its evidence).

The champion of a model is the latest baseline, promotion or forced promotion recorded in
Postgres. Before the first gate decision the newest model in the store is taken as the baseline.
A candidate becomes champion only if its accuracy on the current validation version beats the
champion's on that same version by more than the margin. Nothing here loads torch or MLflow, so
the service can run it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from feedback.datasets.store import DatasetVersion
from feedback.datasets.versions import Loaded, read_version
from feedback.errors import Invalid, NotFound
from feedback.keys import Keys
from feedback.review.audit import audit
from feedback.review.users import User
from models import store
from models.evaluate import Evaluation, evaluate_stored

logger = logging.getLogger(__name__)


class Decision(StrEnum):
    BASELINE = "baseline"  # the model served before the first gate decision, taken as champion
    PROMOTED = "promoted"  # the gate found the candidate better than the champion
    REJECTED = "rejected"  # kept as a candidate; `reason` says why
    FORCED = "forced"  # an admin made it champion regardless of the gate


@dataclass(frozen=True)
class Promotion:
    id: int
    model_name: str
    model_version: str
    decision: Decision
    reason: str
    validation_id: str | None
    dataset_id: str | None
    accuracy: float | None
    champion_version: str | None
    champion_accuracy: float | None
    margin: float | None  # the gate's: the candidate had to beat the champion by more than this
    run_id: str | None
    actor: str | None
    at: datetime
    live_evidence: dict[str, Any] | None = None  # a shadow's figures, for a decision taken on them
    # Beside the gate's: the candidate's and the champion's accuracy on the live validation version
    live_validation: dict[str, Any] | None = None


def announce(client: redis.Redis, keys: Keys, model_name: str, model_version: str) -> None:
    """Tell every service worker: the key for those that start or missed it, the message for the rest."""
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.champion(model_name), model_version)
    pipe.publish(keys.promotions, json.dumps({"model_name": model_name, "model_version": model_version}))
    pipe.execute()
    logger.info("announced %s:%s as champion on %s", model_name, model_version, keys.promotions)


# -- the gate -------------------------------------------------------------------------------------


def gate(candidate: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Whether a candidate with `candidate` accuracy replaces a champion with `champion`, and why."""
    if champion is None:
        return True, "no champion yet"
    gain = candidate - champion
    if gain > margin + 1e-9:  # accuracies are ratios of counts: 0.9 - 0.85 must not beat 0.05
        return True, f"accuracy {candidate:.4f} beats the champion's {champion:.4f} by {gain:+.4f} (margin {margin})"
    return False, f"accuracy {candidate:.4f} does not beat the champion's {champion:.4f} by more than {margin}"


def evaluation_on(
    conn: psycopg.Connection,
    model_name: str,
    model_version: str,
    validation: DatasetVersion,
    *,
    rows: Loaded | None = None,
) -> float:
    """A stored model's accuracy on a validation version, evaluated (and recorded) when not yet known.

    `rows` are the validation version's rows when the caller has read them already."""
    known = get_evaluation(conn=conn, model_name=model_name, model_version=model_version, validation_id=validation.id)
    if known is not None:
        return known
    loaded = rows if rows is not None else read_version(validation.uri)
    evaluation, _ = evaluate_stored(store.get(f"{model_name}:{model_version}"), loaded.inputs, loaded.labels)
    record_evaluation(conn, model_name, model_version, validation.id, evaluation)
    return evaluation.accuracy


def record_evaluation(
    conn: psycopg.Connection, model_name: str, model_version: str, validation_id: str, evaluation: Evaluation
) -> None:
    _save_evaluation(
        conn=conn,
        model_name=model_name,
        model_version=model_version,
        validation_id=validation_id,
        accuracy=evaluation.accuracy,
        figures={
            "ece": evaluation.ece,
            "per_class": {k: vars(v) for k, v in evaluation.per_class.items()},
            "confusion": evaluation.confusion,
            "samples": evaluation.samples,
        },
    )


def champion_or_baseline(
    conn: psycopg.Connection, model_name: str, validation: DatasetVersion, *, rows: Loaded | None = None
) -> Promotion | None:
    """The recorded champion; before the first decision, the newest model in the store as baseline."""
    current = champion(conn=conn, model_name=model_name)
    if current is not None or not store.exists(f"{model_name}:latest"):
        return current
    baseline = store.get(f"{model_name}:latest")
    accuracy = evaluation_on(conn, model_name, baseline.version, validation, rows=rows)
    return record_promotion(
        conn=conn,
        model_name=model_name,
        model_version=baseline.version,
        decision=Decision.BASELINE,
        reason="the newest model in the store before the first gate decision",
        validation_id=validation.id,
        accuracy=accuracy,
    )


def reevaluate(conn: psycopg.Connection, *, old: DatasetVersion, new: DatasetVersion) -> list[tuple[str, str, float]]:
    """Evaluate every model that was compared on validation version `old` on `new` as well."""
    done: list[tuple[str, str, float]] = []
    models = evaluated_models(conn=conn, validation_id=old.id)
    rows = read_version(new.uri) if models else None  # read once for all of them
    for model_name, model_version in models:
        if not store.exists(f"{model_name}:{model_version}"):
            logger.warning("%s:%s is no longer in the model store; not re-evaluated", model_name, model_version)
            continue
        done.append((model_name, model_version, evaluation_on(conn, model_name, model_version, new, rows=rows)))
    return done


def stored_version(model_name: str, model_version: str) -> store.StoredModel:
    """A version in the model store; `NotFound` if it is not there, `Invalid` for no version at all."""
    try:
        return store.get(f"{model_name}:{model_version}")
    except store.ModelNotFound as exc:
        raise NotFound(str(exc)) from None
    except store.InvalidModelTag as exc:
        raise Invalid(str(exc)) from None


def promote(
    *,
    conn: psycopg.Connection,
    model_name: str,
    model_version: str,
    reason: str,
    actor: User,
    announcer: Callable[[str, str], None] | None = None,
) -> Promotion:
    """Make a stored model champion whatever the gate says: an admin's action, recorded as such."""
    if not reason.strip():
        raise Invalid("a forced promotion needs a reason")
    stored = stored_version(model_name, model_version)
    promotion = record_promotion(
        conn=conn,
        model_name=model_name,
        model_version=stored.version,
        decision=Decision.FORCED,
        reason=reason,
        actor=actor,
    )
    if announcer is not None:
        announcer(model_name, stored.version)
    return promotion


# -- evaluations ----------------------------------------------------------------------------------


def _save_evaluation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    model_version: str,
    validation_id: str,
    accuracy: float,
    figures: dict[str, Any],
) -> None:
    conn.execute(
        """INSERT INTO evaluations (model_name, model_version, validation_id, accuracy, figures)
           VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (model_name, model_version, validation_id)
           DO UPDATE SET accuracy = EXCLUDED.accuracy, figures = EXCLUDED.figures, evaluated_at = now()""",
        (model_name, model_version, validation_id, accuracy, Jsonb(figures)),
    )


def get_evaluation(
    *, conn: psycopg.Connection, model_name: str, model_version: str, validation_id: str
) -> float | None:
    row = conn.execute(
        "SELECT accuracy FROM evaluations WHERE model_name = %s AND model_version = %s AND validation_id = %s",
        (model_name, model_version, validation_id),
    ).fetchone()
    return None if row is None else float(row[0])


def evaluated_models(*, conn: psycopg.Connection, validation_id: str) -> list[tuple[str, str]]:
    """(model name, version) of every model evaluated on a validation version."""
    rows = conn.execute(
        "SELECT model_name, model_version FROM evaluations WHERE validation_id = %s ORDER BY model_name, model_version",
        (validation_id,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


# -- promotions -----------------------------------------------------------------------------------


def record_promotion(
    *,
    conn: psycopg.Connection,
    model_name: str,
    model_version: str,
    decision: Decision,
    reason: str,
    validation_id: str | None = None,
    dataset_id: str | None = None,
    accuracy: float | None = None,
    champion_version: str | None = None,
    champion_accuracy: float | None = None,
    margin: float | None = None,
    run_id: str | None = None,
    actor: User | None = None,
    live_evidence: dict[str, Any] | None = None,
    live_validation: dict[str, Any] | None = None,
) -> Promotion:
    with conn.transaction():
        row = conn.execute(
            """INSERT INTO promotions (model_name, model_version, decision, reason, validation_id, dataset_id,
                   accuracy, champion_version, champion_accuracy, margin, run_id, actor_id, live_evidence,
                   live_validation)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
            (
                model_name,
                model_version,
                decision.value,
                reason,
                validation_id,
                dataset_id,
                accuracy,
                champion_version,
                champion_accuracy,
                margin,
                run_id,
                actor.id if actor else None,
                None if live_evidence is None else Jsonb(live_evidence),
                None if live_validation is None else Jsonb(live_validation),
            ),
        ).fetchone()
        assert row is not None
        audit(conn, actor, f"model.{decision.value}", f"{model_name}:{model_version}", reason=reason)
        if decision in (Decision.PROMOTED, Decision.FORCED):  # a new champion ends the shadow it was judged beside
            conn.execute(
                "UPDATE shadows SET stopped_at = now(), stopped_by = %s, stop_reason = %s"
                " WHERE model_name = %s AND stopped_at IS NULL",
                (actor.id if actor else None, f"{model_name}:{model_version} became champion ({decision})", model_name),
            )
    found = _promotions(conn, "p.id = %s", (int(row[0]),))
    return found[0]


def champion(*, conn: psycopg.Connection, model_name: str) -> Promotion | None:
    """The model's latest baseline, promotion or forced promotion; None before the first."""
    found = _promotions(
        conn,
        "p.model_name = %s AND p.decision IN ('baseline', 'promoted', 'forced') ORDER BY p.id DESC LIMIT 1",
        (model_name,),
    )
    return found[0] if found else None


def promotions(*, conn: psycopg.Connection, model_name: str) -> list[Promotion]:
    return _promotions(conn, "p.model_name = %s ORDER BY p.id", (model_name,))


def _promotions(conn: psycopg.Connection, where: str, params: tuple[Any, ...]) -> list[Promotion]:
    rows = conn.execute(
        "SELECT p.id, p.model_name, p.model_version, p.decision, p.reason, p.validation_id, p.dataset_id, p.accuracy,"
        " p.champion_version, p.champion_accuracy, p.margin, p.run_id, u.name, p.at, p.live_evidence, p.live_validation"
        f" FROM promotions p LEFT JOIN users u ON u.id = p.actor_id WHERE {where}",
        params,
    ).fetchall()
    return [
        Promotion(
            id=int(r[0]),
            model_name=r[1],
            model_version=r[2],
            decision=Decision(r[3]),
            reason=r[4],
            validation_id=r[5],
            dataset_id=r[6],
            accuracy=r[7],
            champion_version=r[8],
            champion_accuracy=r[9],
            margin=r[10],
            run_id=r[11],
            actor=r[12],
            at=r[13],
            live_evidence=r[14],
            live_validation=r[15],
        )
        for r in rows
    ]
