"""Who serves: the champion, the promotion gate, forced promotions, announcements, re-evaluations.

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

import psycopg
import redis

from feedback import dataset_store
from feedback.dataset_store import DatasetVersion, Decision, Promotion
from feedback.datasets import Loaded, read_version
from feedback.keys import Keys
from feedback.review_store import Invalid, User
from models import store
from models.evaluate import Evaluation, evaluate_stored

logger = logging.getLogger(__name__)


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
    known = dataset_store.get_evaluation(
        conn=conn, model_name=model_name, model_version=model_version, validation_id=validation.id
    )
    if known is not None:
        return known
    loaded = rows if rows is not None else read_version(validation.uri)
    evaluation, _ = evaluate_stored(store.get(f"{model_name}:{model_version}"), loaded.inputs, loaded.labels)
    record_evaluation(conn, model_name, model_version, validation.id, evaluation)
    return evaluation.accuracy


def record_evaluation(
    conn: psycopg.Connection, model_name: str, model_version: str, validation_id: str, evaluation: Evaluation
) -> None:
    dataset_store.record_evaluation(
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
    current = dataset_store.champion(conn=conn, model_name=model_name)
    if current is not None or not store.exists(f"{model_name}:latest"):
        return current
    baseline = store.get(f"{model_name}:latest")
    accuracy = evaluation_on(conn, model_name, baseline.version, validation, rows=rows)
    return dataset_store.record_promotion(
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
    models = dataset_store.evaluated_models(conn=conn, validation_id=old.id)
    rows = read_version(new.uri) if models else None  # read once for all of them
    for model_name, model_version in models:
        if not store.exists(f"{model_name}:{model_version}"):
            logger.warning("%s:%s is no longer in the model store; not re-evaluated", model_name, model_version)
            continue
        done.append((model_name, model_version, evaluation_on(conn, model_name, model_version, new, rows=rows)))
    return done


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
    stored = store.get(f"{model_name}:{model_version}")  # ModelNotFound if it is not there
    promotion = dataset_store.record_promotion(
        conn=conn, model_name=model_name, model_version=stored.version, decision=Decision.FORCED, reason=reason,
        actor=actor,
    )  # fmt: skip
    if announcer is not None:
        announcer(model_name, stored.version)
    return promotion
