"""Per-reviewer quality for admins: `GET /admin/reviewers` (each reviewer's figures over a period,
flagged against the targets), `PUT /admin/reviewers/targets`, and the gold items that measure
reviewers (`POST|GET /admin/gold`), and labels weighted by each reviewer's reliability
(`GET /admin/weighted`)."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from feedback.errors import Conflict
from feedback.review import gold, quality, weighting
from service.problems import documented
from service.routes.admin import Loop, Model
from service.routes.dependencies import Admin, Connection, GuardedRoute, RequestBody
from service.routes.fields import Flag, Instant, ItemId, Name, Number

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    route_class=GuardedRoute,
    responses=documented(400, 401, 403, 404, 409, 413, 422, 429, 503),
)


class TargetsIn(RequestBody):
    min_per_day: Number | None = Field(None, ge=0, description="Verdicts per active day, at least")
    max_median_seconds: Number | None = Field(None, ge=0, description="Median seconds from lease to verdict, at most")
    min_agreement: Number | None = Field(None, ge=0, le=1, description="Agreement with the settled label, at least")
    max_undo_rate: Number | None = Field(None, ge=0, le=1, description="Undos per verdict, at most")
    max_discard_rate: Number | None = Field(None, ge=0, le=1, description="Discards per verdict, at most")
    min_gold_accuracy: Number | None = Field(None, ge=0, le=1, description="Accuracy on gold items, at least")


class TargetsPublic(BaseModel):
    min_per_day: float | None
    max_median_seconds: float | None
    min_agreement: float | None
    max_undo_rate: float | None
    max_discard_rate: float | None
    min_gold_accuracy: float | None


class ReviewerPublic(BaseModel):
    reviewer: str
    verdicts: int
    active_days: int
    per_day: float = Field(description="Verdicts per active day")
    median_seconds: float | None = Field(description="From the lease to the verdict")
    agreed: int
    settled: int = Field(description="Items now settled on which the reviewer's latest verdict says a label")
    agreement: float | None = Field(description="agreed / settled")
    undos: int
    undo_rate: float
    discards: int
    discard_rate: float
    gold_right: int
    gold_scored: int = Field(description="Gold items answered with a label or discarded, not withdrawn")
    gold_accuracy: float | None
    gold_low: float | None = Field(description="Wilson's 95% interval of the gold accuracy")
    gold_high: float | None
    flags: list[str] = Field(description="The figures beyond their targets")


class ReviewersPublic(BaseModel):
    since: datetime
    until: datetime
    targets: TargetsPublic
    reviewers: list[ReviewerPublic]


@router.get("/reviewers", response_model=ReviewersPublic)
def reviewers(
    admin: Admin,
    conn: Connection,
    since: Annotated[Instant | None, Query(description="Default: 30 days before `until`.")] = None,
    until: Annotated[Instant | None, Query(description="Default: now.")] = None,
) -> ReviewersPublic:
    """Each reviewer's figures over the period, each against the targets (those beyond are flagged);
    an empty period (`since` not before `until`) has none."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=30)
    targets = quality.get_targets(conn=conn)
    found = [] if since >= until else quality.reviewer_quality(conn=conn, since=since, until=until, targets=targets)
    return ReviewersPublic(
        since=since,
        until=until,
        targets=TargetsPublic(**asdict(targets)),
        reviewers=[ReviewerPublic(**asdict(q)) for q in found],
    )


@router.put("/reviewers/targets", response_model=TargetsPublic)
def set_targets(admin: Admin, conn: Connection, body: TargetsIn) -> TargetsPublic:
    """The targets every reviewer's figures are held to (a figure without one is not flagged)."""
    targets = quality.set_targets(conn=conn, admin=admin, targets=quality.Targets(**body.model_dump()))
    return TargetsPublic(**asdict(targets))


class GoldLabel(RequestBody):
    prediction_id: ItemId
    label: Name


class GoldIn(RequestBody):
    items: list[GoldLabel] | None = Field(None, max_length=10_000, description="Items and their right labels")
    from_disputes: Flag = Field(False, description="Every item of the model whose dispute an admin resolved")
    from_validation: Annotated[str, Field(pattern="^[0-9a-f]{32}$")] | None = Field(
        None, description="The logged predictions a validation version (its id) holds"
    )


class GoldItemPublic(BaseModel):
    prediction_id: uuid.UUID
    model_name: str
    label: str
    source: str


@router.post("/gold", response_model=list[GoldItemPublic])
def mark_gold(admin: Admin, conn: Connection, model: Model, body: GoldIn) -> list[GoldItemPublic]:
    """Mark gold items of the model (`?model=`): named ones, those whose dispute was resolved, or the
    logged predictions of a validation version, with their labels (404 for a version that is not
    one of the model's); answers on them measure reviewers and never change the items. The model's
    gold items."""
    chosen = [(g.prediction_id, g.label) for g in body.items or []]
    strange = sorted({label for _, label in chosen} - set(model.schema.class_names))
    if strange:  # the model's classes are the service's state, not the request's shape
        raise Conflict(
            f"not classes of {model.name}: {', '.join(strange)} (its classes: {', '.join(model.schema.class_names)})"
        )
    if body.from_disputes:
        gold.mark(conn=conn, admin=admin, items=gold.from_disputes(conn=conn, model_name=model.name), source="dispute")
    if body.from_validation is not None:
        found = gold.from_validation(conn=conn, model_name=model.name, version_id=body.from_validation)
        gold.mark(conn=conn, admin=admin, items=found, source="validation")
    if chosen:
        gold.mark(conn=conn, admin=admin, items=chosen)
    return [GoldItemPublic(**asdict(g)) for g in gold.listed(conn=conn, model_name=model.name)]


@router.get("/gold", response_model=list[GoldItemPublic])
def gold_items(admin: Admin, conn: Connection, model: Model) -> list[GoldItemPublic]:
    """The model's gold items (`?model=`)."""
    return [GoldItemPublic(**asdict(g)) for g in gold.listed(conn=conn, model_name=model.name)]


class WeightedDisputePublic(BaseModel):
    prediction_id: uuid.UUID
    label: str = Field(description="The most likely label, weighted by reliability (or `<discarded>`)")
    confidence: float
    settles: bool = Field(description="At least `min_confidence` likely: a compile with weighting takes it")


class WeightedPublic(BaseModel):
    method: str
    library: str
    min_confidence: float
    judged_items: int = Field(description="Items two or more reviewers judged, which the weights are fit on")
    reliability: dict[str, float] = Field(description="Each reviewer's estimated chance of saying the true label")
    disputes: list[WeightedDisputePublic]


@router.get("/weighted", response_model=WeightedPublic)
def weighted(admin: Admin, conn: Connection, model: Model, loop: Loop) -> WeightedPublic:
    """Labels weighted by reviewer reliability (Dawid-Skene) over the model's items judged by two or
    more reviewers (`?model=`): each reviewer's estimated accuracy, and each open dispute's weighted
    label; those at least `LOOP_LABELS_MIN_CONFIDENCE` likely are settled by a compile with weighting."""
    found = weighting.settle(
        conn=conn, model_name=model.name, watermark=None, min_confidence=loop.weighting.min_confidence
    )
    disputes = [
        WeightedDisputePublic(
            prediction_id=item, label=label, confidence=chance, settles=chance >= found.min_confidence
        )
        for item, (label, chance) in sorted(found.weighted.labels.items())
        if item in found.disputed
    ]
    return WeightedPublic(
        method=weighting.METHOD,
        library=weighting.library(),
        min_confidence=found.min_confidence,
        judged_items=len(found.weighted.labels),
        reliability=weighting.names(conn, found.weighted.reliability),
        disputes=disputes,
    )


class SuspectPublic(BaseModel):
    rank: int = Field(description="1: the most likely label error")
    item_id: str = Field(description="The row's id in the version ranked")
    prediction_id: uuid.UUID | None = Field(description="Set where the row is a logged prediction reviewers can judge")
    label: str = Field(description="The label the version gives it")
    suggested: str = Field(description="The most probable class out of sample")
    quality: float = Field(description="The out-of-sample probability of the label given")


@router.get("/suspects", response_model=list[SuspectPublic])
def label_suspects(
    admin: Admin,
    conn: Connection,
    model: Model,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[SuspectPublic]:
    """The model's likely label errors (`?model=`), most likely first, from its latest ranking
    (`loop review suspects`); the logged predictions among them are the review order `suspect`."""
    from feedback import suspects

    return [SuspectPublic(**asdict(s)) for s in suspects.listed(conn=conn, model_name=model.name, limit=limit)]
