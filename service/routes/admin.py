"""Admins' HTTP API for the data loop, mounted by the service under /admin.

Compile training versions, read versions, fix validation labels (a new validation version, every
model compared on the old one re-evaluated), force a promotion. Every route needs an admin token
and works on one served model: `?model=NAME`, the service's default model when left out. The
service puts a `DataLoopContext` in `app.state.data_loop`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from feedback import datasets as ds
from feedback.champion import Decision, Promotion, promote, promotions
from feedback.datasets import DatasetVersion, Kind
from feedback.datasets import store as dataset_store
from feedback.errors import NotFound, Unavailable
from feedback.review.weighting import Weighting
from feedback.shadow import Accuracy, Evidence, Rules, Shadow, evidence, timeline
from feedback.shadow import history as shadow_history
from feedback.use_cases import (
    ShadowAnnouncer,
    compile_with_validation,
    decide_shadow,
    fix_and_reevaluate,
    start_shadow,
    stop_shadow,
)
from service.problems import documented
from service.routes.dependencies import Admin, Connection, GuardedRoute, RequestBody
from service.routes.fields import NO_NUL, Flag, Integer, ModelName, ModelVersion, Name, Number, Reason


@dataclass
class DataLoopContext:
    model_name: str  # the default model
    schema: Callable[[str], ds.LabelSchema]  # a served model's classes and input; NotFound if not served
    originals: Callable[[psycopg.Connection, str], ds.Originals | None]
    datasets_root: str
    announcer: Callable[[str, str], None] | None = None
    shadow_announcer: ShadowAnnouncer | None = None
    shadow_rules: Rules = field(default_factory=Rules)  # deciding on a shadow (LOOP_SHADOW_*)
    health_alpha: float = 0.01  # the drift tests' level (LOOP_HEALTH_ALPHA)
    weighting: Weighting = field(default_factory=Weighting)  # disputes settled by weighted labels (LOOP_LABELS_*)


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    route_class=GuardedRoute,
    responses=documented(400, 401, 403, 404, 409, 413, 422, 429, 503),
)


def _loop(request: Request) -> DataLoopContext:
    context: DataLoopContext | None = getattr(request.app.state, "data_loop", None)
    if context is None:
        raise Unavailable("the data loop needs a database (LOOP_DATABASE_URL)")
    return context


Loop = Annotated[DataLoopContext, Depends(_loop)]


@dataclass(frozen=True)
class Target:
    """The model a request works on, with its label schema."""

    name: str
    schema: ds.LabelSchema


ModelQuery = Annotated[ModelName | None, Query(description="A served model (default: the default model).")]


def _target(loop: Loop, model: ModelQuery = None) -> Target:
    name = model or loop.model_name
    return Target(name=name, schema=loop.schema(name))  # NotFound: refused before anything is read


Model = Annotated[Target, Depends(_target)]


class DatasetVersionPublic(BaseModel):
    id: str = Field(description="DVC's directory hash of the version's files (`dvc add` records `<id>.dir`).")
    kind: Kind
    model_name: str
    uri: str
    watermark: int | None = Field(description="Highest annotation revision included (training versions).")
    validation_id: str | None = Field(description="The validation version held out of this training version.")
    parent_id: str | None = Field(description="The validation version this one fixes.")
    rows: int
    per_class: dict[str, int]
    created_by: str | None
    created_at: datetime
    manifest: dict[str, Any]

    @classmethod
    def of(cls, v: DatasetVersion) -> DatasetVersionPublic:
        return cls(
            id=v.id,
            kind=v.kind,
            model_name=v.model_name,
            uri=v.uri,
            watermark=v.watermark,
            validation_id=v.validation_id,
            parent_id=v.parent_id,
            rows=v.rows,
            per_class=v.per_class,
            created_by=v.created_by,
            created_at=v.created_at,
            manifest=v.manifest,
        )


class CompileIn(RequestBody):
    watermark: Integer | None = Field(None, ge=0, description="Highest annotation revision; default: all settled.")
    include_original: Flag = Field(True, description="Include the data the model was first trained on, if it has any.")
    weighted: Flag | None = Field(
        None,
        description="Settle disputes by labels weighted by reviewer reliability (Dawid-Skene) where they are at "
        "least LOOP_LABELS_MIN_CONFIDENCE likely; default: LOOP_LABELS_WEIGHTING.",
    )


class LabelFixIn(RequestBody):
    item_id: Annotated[str, Field(min_length=1, max_length=128, pattern=NO_NUL)]
    label: Name


class ValidationFixIn(RequestBody):
    fixes: list[LabelFixIn] = Field(min_length=1, max_length=1000)
    reason: Reason


class Reevaluated(BaseModel):
    model_name: str
    model_version: str
    accuracy: float


class ValidationFixed(BaseModel):
    version: DatasetVersionPublic
    reevaluated: list[Reevaluated]


class PromoteIn(RequestBody):
    reason: Reason


class PromotionPublic(BaseModel):
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
    margin: float | None = Field(description="The gate's margin: the candidate had to beat the champion by more.")
    run_id: str | None
    actor: str | None
    at: datetime
    live_evidence: dict[str, Any] | None = Field(
        None, description="A shadow's evidence on live items, for a decision taken on it (`POST /admin/shadow/decide`)."
    )
    live_validation: dict[str, Any] | None = Field(
        None,
        description="Beside the gate's figures: the live validation version (`id`, `samples`) and the candidate's "
        "`accuracy` and the champion's `champion_accuracy` on it.",
    )

    @classmethod
    def of(cls, p: Promotion) -> PromotionPublic:
        return cls(**{name: getattr(p, name) for name in cls.model_fields})


@router.post("/datasets", response_model=DatasetVersionPublic, status_code=201)
def compile_dataset(body: CompileIn, conn: Connection, loop: Loop, model: Model, admin: Admin) -> Any:
    """Compile a training version of the model from the current labels (the same labels give the same id)."""
    version = compile_with_validation(
        conn=conn,
        model_name=model.name,
        schema=model.schema,
        originals=lambda: loop.originals(conn, model.name),
        include_original=body.include_original,
        root_url=loop.datasets_root,
        watermark=body.watermark,
        actor=admin,
        weighting=loop.weighting if body.weighted is None else replace(loop.weighting, enabled=body.weighted),
    )
    return DatasetVersionPublic.of(version)


@router.get("/datasets", response_model=list[DatasetVersionPublic])
def list_datasets(conn: Connection, model: Model, admin: Admin, kind: Kind | None = None) -> Any:
    """Original, training and validation versions of the model, oldest first."""
    versions = dataset_store.list_versions(conn=conn, model_name=model.name, kind=kind)
    return [DatasetVersionPublic.of(v) for v in versions]


@router.get("/datasets/{version_id}", response_model=DatasetVersionPublic)
def get_dataset(version_id: str, conn: Connection, admin: Admin) -> Any:
    """One version with its manifest."""
    version = dataset_store.get_version(conn=conn, version_id=version_id)
    if version is None:
        raise NotFound(f"no dataset version {version_id}")
    return DatasetVersionPublic.of(version)


@router.post("/validation/fixes", response_model=ValidationFixed, status_code=201)
def fix_validation(body: ValidationFixIn, conn: Connection, loop: Loop, model: Model, admin: Admin) -> Any:
    """Fix validation labels: a new validation version; models compared on the old one are re-evaluated."""
    fixes = [ds.LabelFix(item_id=f.item_id, label=f.label, reason=body.reason) for f in body.fixes]
    fixed = fix_and_reevaluate(
        conn=conn,
        model_name=model.name,
        fixes=fixes,
        schema=model.schema,
        root_url=loop.datasets_root,
        actor=admin,
    )
    return ValidationFixed(
        version=DatasetVersionPublic.of(fixed.new),
        reevaluated=[Reevaluated(model_name=n, model_version=v, accuracy=a) for n, v, a in fixed.reevaluated],
    )


@router.post("/models/{version}/promote", response_model=PromotionPublic)
def force_promotion(
    version: ModelVersion, body: PromoteIn, *, conn: Connection, loop: Loop, model: Model, admin: Admin
) -> Any:
    """Make a stored version of the model champion regardless of the gate (recorded, announced)."""
    promotion = promote(
        conn=conn,
        model_name=model.name,
        model_version=version,
        reason=body.reason,
        actor=admin,
        announcer=loop.announcer,
    )  # NotFound for a version not in the store
    return PromotionPublic.of(promotion)


@router.get("/promotions", response_model=list[PromotionPublic])
def list_promotions(conn: Connection, model: Model, admin: Admin) -> Any:
    """Every gate decision and forced promotion of the model, oldest first; the last baseline,
    promoted or forced one is the champion."""
    found = promotions(conn=conn, model_name=model.name)
    return [PromotionPublic.of(p) for p in found]


# -- shadows ----------------------------------------------------------------------------------------


class ShadowIn(RequestBody):
    version: ModelVersion = Field(description="A stored version of the model (a candidate, usually).")
    share: Number = Field(1.0, ge=0.001, le=1, description="The share of its prediction requests it sees (0.001 to 1).")


class ShadowStopIn(RequestBody):
    reason: Reason


class ShadowPublic(BaseModel):
    id: int
    model_name: str
    model_version: str
    share: float
    started_at: datetime
    started_by: str | None
    stopped_at: datetime | None
    stopped_by: str | None
    stop_reason: str | None
    live: bool

    @classmethod
    def of(cls, s: Shadow) -> ShadowPublic:
        return cls(**{name: getattr(s, name) for name in cls.model_fields})


class AccuracyPublic(BaseModel):
    value: float | None = Field(description="Right on the judged items; null when none is judged.")
    correct: int
    judged: int
    low: float = Field(description="The 95% Wilson score interval's lower bound.")
    high: float


class LatencyPublic(BaseModel):
    p50_ms: float | None = Field(description="Median milliseconds over the shadowed samples; null before any.")
    p95_ms: float | None


class MomentPublic(BaseModel):
    until: datetime = Field(description="The end of a stretch of the shadow's time (by when items were predicted).")
    judged: int = Field(description="Judged items predicted up to then.")
    champion_correct: int = Field(description="Of those, the answers that were right.")
    shadow_correct: int


class EvidencePublic(BaseModel):
    shadow_version: str
    shadowed: int = Field(description="Samples the shadow predicted since it started (ingested).")
    agreement: float | None = Field(description="The share of those it labelled as the answer did.")
    judged: int = Field(description="Those that reviewers settled with a label.")
    champion: AccuracyPublic = Field(description="The answers' accuracy on the judged items.")
    shadow: AccuracyPublic = Field(description="The shadow's accuracy on the same items.")
    only_champion_right: int
    only_shadow_right: int
    p_value: float = Field(description="McNemar's exact test (two-sided) that both are right as often.")
    answer_latency: LatencyPublic = Field(
        description="The answers' model call as each request waited for it (its batch's queue and inference)."
    )
    shadow_latency: LatencyPublic = Field(
        description="The shadow's call that ran each sample (one call takes many answered batches at once)."
    )

    @classmethod
    def of(cls, e: Evidence) -> EvidencePublic:
        def accuracy(a: Accuracy) -> AccuracyPublic:
            return AccuracyPublic(value=a.value, correct=a.correct, judged=a.judged, low=a.low, high=a.high)

        fields = ("shadow_version", "shadowed", "agreement", "judged", "only_champion_right", "only_shadow_right")
        return cls(
            **{name: getattr(e, name) for name in fields},
            champion=accuracy(e.champion),
            shadow=accuracy(e.shadow),
            p_value=e.p_value,
            answer_latency=LatencyPublic(**asdict(e.answer_latency)),
            shadow_latency=LatencyPublic(**asdict(e.shadow_latency)),
        )


class ShadowsPublic(BaseModel):
    live: ShadowPublic | None = Field(description="The shadow running now, if any.")
    evidence: EvidencePublic | None = Field(description="The live shadow's evidence, else the last one's.")
    history: list[ShadowPublic] = Field(description="Every shadow of the model, oldest first.")
    over_time: list[MomentPublic] = Field(
        description="Both accuracies' counts, cumulative, at the end of up to 48 stretches of the shadow's time."
    )


@router.post("/shadow", response_model=ShadowPublic, status_code=201)
def start_shadow_of(body: ShadowIn, conn: Connection, loop: Loop, model: Model, admin: Admin) -> Any:
    """Start a shadow of the model: a stored version that sees `share` of its prediction requests
    after they were answered, and is never returned to a client (409 while another one runs)."""
    started = start_shadow(
        conn=conn,
        model_name=model.name,
        model_version=body.version,
        share=body.share,
        actor=admin,
        announcer=loop.shadow_announcer,
    )
    return ShadowPublic.of(started)


@router.post("/shadow/stop", response_model=ShadowPublic)
def stop_shadow_of(body: ShadowStopIn, conn: Connection, loop: Loop, model: Model, admin: Admin) -> Any:
    """Stop the model's shadow, saying why (404 when none runs)."""
    stopped = stop_shadow(
        conn=conn, model_name=model.name, reason=body.reason, actor=admin, announcer=loop.shadow_announcer
    )
    return ShadowPublic.of(stopped)


@router.get("/shadow", response_model=ShadowsPublic)
def shadows_of(conn: Connection, model: Model, admin: Admin) -> Any:
    """The model's shadow running now, its evidence against the answers so far, and every shadow
    the model has had."""
    shadows = shadow_history(conn=conn, model_name=model.name)
    latest = shadows[-1] if shadows else None
    return ShadowsPublic(
        live=ShadowPublic.of(latest) if latest is not None and latest.live else None,
        evidence=None if latest is None else EvidencePublic.of(evidence(conn=conn, shadow=latest)),
        history=[ShadowPublic.of(s) for s in shadows],
        over_time=[] if latest is None else [MomentPublic(**asdict(m)) for m in timeline(conn=conn, shadow=latest)],
    )


class ShadowDecisionPublic(BaseModel):
    promotion: PromotionPublic = Field(description="The decision (promoted or rejected) with its figures.")
    evidence: EvidencePublic


@router.post("/shadow/decide", response_model=ShadowDecisionPublic)
def decide_on_shadow(conn: Connection, loop: Loop, model: Model, admin: Admin) -> Any:
    """Promote the model's shadow or reject it, on the frozen-set gate and its judged live items
    (the service's LOOP_SHADOW_POLICY); recorded with both sets of figures; the shadow stops."""
    decided = decide_shadow(
        conn=conn,
        model_name=model.name,
        rules=loop.shadow_rules,
        actor=admin,
        announcer=loop.announcer,
        shadow_announcer=loop.shadow_announcer,
    )
    return ShadowDecisionPublic(
        promotion=PromotionPublic.of(decided.promotion), evidence=EvidencePublic.of(decided.evidence)
    )
