"""What the command line, the HTTP routes and the demos share: each use case written once.

Compile a training version with the model's validation version (freezing it on first use), fix
validation labels and re-evaluate every model compared on the old version, announce a champion,
start and stop a shadow and announce it, decide on a shadow's evidence.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis

from feedback import shadow
from feedback.champion import (
    Decision,
    Promotion,
    announce,
    champion_or_baseline,
    evaluation_on,
    gate,
    record_promotion,
    reevaluate,
)
from feedback.datasets import versions
from feedback.datasets.compiling import compile_training
from feedback.datasets.schema import LabelSchema, Originals, Progress
from feedback.datasets.store import DatasetVersion, current_validation
from feedback.datasets.validation import LabelFix, fix_validation, freeze_validation, freeze_validation_from_verdicts
from feedback.errors import Conflict, NotFound
from feedback.keys import Keys
from feedback.predictions import blobs, partitions, retention
from feedback.predictions.partitions import AHEAD_DAYS
from feedback.review.users import User
from feedback.review.weighting import UNWEIGHTED, Weighting


def compile_with_validation(
    *,
    conn: psycopg.Connection,
    model_name: str,
    schema: LabelSchema,
    originals: Callable[[], Originals | None],
    include_original: bool,
    root_url: str,
    watermark: int | None = None,
    actor: User | None = None,
    progress: Progress | None = None,
    weighting: Weighting = UNWEIGHTED,
) -> DatasetVersion:
    """Compile a training version, freezing the model's validation version first if it has none:
    from its original split when it has original data, else from its judged items. `originals`
    is called only when they are needed; a model without any compiles from verdicts alone.
    `weighting`: see `compile_training`."""
    validation = current_validation(conn=conn, model_name=model_name)
    found = originals() if include_original or validation is None else None
    if validation is None:
        if found is not None:
            validation = freeze_validation(
                conn=conn, model_name=model_name, originals=found, schema=schema, root_url=root_url, actor=actor
            )
        else:
            validation = freeze_validation_from_verdicts(
                conn=conn, model_name=model_name, schema=schema, root_url=root_url, actor=actor
            )
    return compile_training(
        conn=conn,
        model_name=model_name,
        schema=schema,
        originals=found if include_original else None,
        validation=validation,
        root_url=root_url,
        watermark=watermark,
        actor=actor,
        progress=progress,
        weighting=weighting,
    )


@dataclass(frozen=True)
class ValidationFixed:
    old: DatasetVersion
    new: DatasetVersion
    reevaluated: list[tuple[str, str, float]]  # (model name, version, accuracy on the new version)


def fix_and_reevaluate(
    *,
    conn: psycopg.Connection,
    model_name: str,
    fixes: list[LabelFix],
    schema: LabelSchema,
    root_url: str,
    actor: User,
) -> ValidationFixed:
    """A new validation version with `fixes`; every model compared on the old one is evaluated on it."""
    old = current_validation(conn=conn, model_name=model_name)
    new = fix_validation(conn=conn, model_name=model_name, fixes=fixes, schema=schema, root_url=root_url, actor=actor)
    assert old is not None  # fix_validation refuses when there is none
    return ValidationFixed(old=old, new=new, reevaluated=reevaluate(conn, old=old, new=new))


def announcer(redis_url: str, keys: Keys) -> Callable[[str, str], None]:
    """A function that announces a champion on `redis_url` (a connection each time: promotions are rare)."""

    def announce_on_redis(model_name: str, version: str) -> None:
        with redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5) as client:
            announce(client, keys, model_name, version)

    return announce_on_redis


ShadowAnnouncer = Callable[[str, "shadow.Shadow | None"], None]


def shadow_announcer(redis_url: str, keys: Keys) -> ShadowAnnouncer:
    """A function that announces a model's shadow (None: none) on `redis_url`."""

    def announce_on_redis(model_name: str, running: shadow.Shadow | None) -> None:
        with redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5) as client:
            shadow.announce(client, keys, model_name, running)

    return announce_on_redis


def start_shadow(
    *,
    conn: psycopg.Connection,
    model_name: str,
    model_version: str,
    share: float,
    actor: User | None,
    announcer: ShadowAnnouncer | None,
) -> shadow.Shadow:
    """Start a shadow (recorded, then announced to the workers)."""
    started = shadow.start(conn=conn, model_name=model_name, model_version=model_version, share=share, actor=actor)
    if announcer is not None:
        announcer(model_name, started)
    return started


def stop_shadow(
    *, conn: psycopg.Connection, model_name: str, reason: str, actor: User | None, announcer: ShadowAnnouncer | None
) -> shadow.Shadow:
    """Stop the model's shadow (recorded, then announced to the workers)."""
    stopped = shadow.stop(conn=conn, model_name=model_name, reason=reason, actor=actor)
    if announcer is not None:
        announcer(model_name, None)
    return stopped


@dataclass(frozen=True)
class ShadowDecision:
    promotion: Promotion  # promoted or rejected, with the live evidence's figures
    evidence: shadow.Evidence


def decide_shadow(
    *,
    conn: psycopg.Connection,
    model_name: str,
    rules: shadow.Rules,
    actor: User | None,
    announcer: Callable[[str, str], None] | None,
    shadow_announcer: ShadowAnnouncer | None,
) -> ShadowDecision:
    """Promote the model's shadow or reject it, on both pieces of evidence: the frozen-set gate
    (its accuracy on the validation version against the champion's, by more than the rules'
    margin) and the judged live items (the rules' policy). The decision is recorded with both sets
    of figures, the shadow stops either way, and both are announced."""
    running = shadow.current(conn=conn, model_name=model_name)
    if running is None:
        raise NotFound(f"no shadow of {model_name} is running")
    validation = current_validation(conn=conn, model_name=model_name)
    if validation is None:
        raise Conflict(f"{model_name} has no validation version yet: compile a dataset first (the frozen-set gate)")
    found = shadow.evidence(conn=conn, shadow=running)
    current = champion_or_baseline(conn, model_name, validation)
    accuracy = evaluation_on(conn, model_name, running.model_version, validation)
    champion_accuracy = None if current is None else evaluation_on(conn, model_name, current.model_version, validation)
    frozen_passed, frozen_reason = gate(accuracy, champion_accuracy, rules.margin)
    verdict = shadow.judge(found, frozen_passed=frozen_passed, rules=rules)
    promotion = record_promotion(
        conn=conn,
        model_name=model_name,
        model_version=running.model_version,
        decision=Decision.PROMOTED if verdict.promote else Decision.REJECTED,
        reason=f"live evidence ({rules.policy}): {verdict.reason}; frozen set: {frozen_reason}",
        validation_id=validation.id,
        accuracy=accuracy,
        champion_version=None if current is None else current.model_version,
        champion_accuracy=champion_accuracy,
        margin=rules.margin,
        actor=actor,
        live_evidence=shadow.figures(found),
    )  # a promotion stops the shadow
    if verdict.promote and announcer is not None:
        announcer(model_name, running.model_version)
    if not verdict.promote:
        shadow.stop(conn=conn, model_name=model_name, reason=f"rejected: {verdict.reason}", actor=actor)
    if shadow_announcer is not None:
        shadow_announcer(model_name, None)
    return ShadowDecision(promotion=promotion, evidence=found)


# -- the prediction log's upkeep ----------------------------------------------------------------


@dataclass(frozen=True)
class Upkeep:
    """What `maintain` did (or, dry, would do)."""

    created: list[str]
    expiring: list[retention.Expiring]
    applied: bool


def validation_items(conn: psycopg.Connection) -> set[uuid.UUID]:
    """The prediction ids in any validation version (a model's original data has ids of its own)."""
    found: set[uuid.UUID] = set()
    for (uri,) in conn.execute("SELECT uri FROM dataset_versions WHERE kind = 'validation'").fetchall():
        for item in versions.item_ids(uri):
            with contextlib.suppress(ValueError):
                found.add(uuid.UUID(item))
    return found


def maintain(
    conn: psycopg.Connection, *, retention_days: int | None, dry_run: bool = False, ahead_days: int = AHEAD_DAYS
) -> Upkeep:
    """Partitions for the coming days; with `retention_days`, the partitions past it dropped whole,
    their protected items kept (`feedback.predictions.retention`). Dry: only say what would go."""
    created = [] if dry_run else partitions.ahead(conn, days=ahead_days)
    objects = blobs.of(conn)
    if objects is not None and not dry_run:
        objects.sweep()
    if retention_days is None:
        return Upkeep(created, [], applied=False)
    keep = validation_items(conn)
    expiring = retention.plan(conn, keep_days=retention_days, keep=keep)
    if not dry_run:
        retention.apply(conn, expiring, keep=keep)
    return Upkeep(created, expiring, applied=not dry_run)
