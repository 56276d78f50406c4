"""The reviewers' HTTP API, mounted by the service under /review.

Every route needs `Authorization: Bearer <token>` (401 without a valid one); admin-only routes
answer 403 to reviewers. The service puts a `ModerationContext` in `app.state.moderation`.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from feedback import review as rs
from feedback.errors import Invalid, Unavailable
from feedback.health import drifted_segments
from feedback.predictions.records import input_json
from feedback.review.moderation import Opinion, Status, Verdict, agreement
from service.problems import documented
from service.routes import page
from service.routes.dependencies import (
    Admin,
    Connection,
    Context,
    GuardedRoute,
    ModerationContext,
    RequestBody,
    Reviewer,
)
from service.routes.fields import NO_NUL, Filter, Instant, Integer, ItemId, Name, Number, Reason, Text, UserName

router = APIRouter(
    prefix="/review",
    tags=["review"],
    route_class=GuardedRoute,
    responses=documented(400, 401, 403, 404, 409, 413, 422, 429, 503),
)
router.include_router(page.router)


# -- schemas ------------------------------------------------------------------------------------


class UserPublic(BaseModel):
    id: int
    name: str
    role: rs.Role


class UserCreate(RequestBody):
    name: UserName
    role: rs.Role = rs.Role.REVIEWER


class UserCreated(UserPublic):
    token: str = Field(description="Shown once; only its hash is stored.")


class ItemPublic(BaseModel):
    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str = Field(description="The model's label.")
    confidence: float
    source: str = Field(description="'model', or 'reviewer' for an added sample.")
    status: Status
    reviewed_label: str | None = Field(description="The current label, once reviewed.")
    revision: int | None = Field(description="The latest annotation revision of the item.")
    input_erased: bool


class ItemPage(BaseModel):
    items: list[ItemPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end.")


class ClaimIn(RequestBody):
    count: Integer = Field(10, ge=1, le=100)
    strategy: rs.Strategy = rs.Strategy.OLDEST
    lease_seconds: Number | None = Field(None, ge=1, le=3600, description="Default: the service's setting.")
    created_from: Instant | None = Field(None, description="Only items predicted at or after this time.")
    created_to: Instant | None = Field(None, description="Only items predicted before this time.")
    model_name: Text | None = None
    model_version: Text | None = None
    label: Name | None = Field(None, description="Only items the model gave this label.")
    min_confidence: Number | None = Field(None, ge=0, le=1)
    max_confidence: Number | None = Field(None, ge=0, le=1)

    def filters(self) -> rs.ItemFilter:
        return rs.ItemFilter(
            created_from=self.created_from,
            created_to=self.created_to,
            model_name=self.model_name,
            model_version=self.model_version,
            label=self.label,
            min_confidence=self.min_confidence,
            max_confidence=self.max_confidence,
        )


class Score(BaseModel):
    label: str
    score: float


class ClaimedPublic(BaseModel):
    id: uuid.UUID
    created_at: datetime
    model_name: str
    model_version: str | None = Field(description="The version that answered; null when the item is judged blind.")
    label: str = Field(description="The label proposed: the model's, or in a blind review the answer's or a shadow's.")
    confidence: float
    blind: bool = Field(
        False, description="The label may be the answer's or a shadow's, and which is not said: judge the label shown."
    )
    input: Any = Field(
        description="The sample as sent: numbers for tensor models, {media_type, base64} for image models."
    )
    lease_expires_at: datetime
    required_reviews: int
    top: list[Score] = Field(description="The proposing model's three highest scores, highest first.")


class UndoIn(RequestBody):
    prediction_id: ItemId


class _Verdict(RequestBody):
    prediction_id: ItemId
    reason: Reason | None = None


class Correct(_Verdict):
    verdict: Literal["correct"]


class Wrong(_Verdict):
    verdict: Literal["wrong"]
    label: Name = Field(description="The right label, one of the model's classes.")


class Discard(_Verdict):
    verdict: Literal["discard"]
    reason: Reason = Field(description="Why the item is no use (unreadable, not a sample of any class, …).")


class Unsure(_Verdict):
    verdict: Literal["unsure"]


VerdictCreate = Annotated[Correct | Wrong | Discard | Unsure, Field(discriminator="verdict")]


class VerdictsIn(RequestBody):
    verdicts: list[VerdictCreate] = Field(
        min_length=1,
        max_length=100,
        json_schema_extra={"uniqueItems": True},
        description="At most one verdict per item (the same item twice is refused).",
    )


class ItemStatePublic(BaseModel):
    prediction_id: uuid.UUID
    status: Status
    label: str | None
    revision: int


BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"  # RFC 4648, padded


class ImageIn(RequestBody):
    media_type: Literal["image/png", "image/jpeg", "image/webp"]
    base64: Annotated[str, Field(min_length=4, pattern=BASE64, description="The image's bytes, base64 (RFC 4648).")]


class _Sample(RequestBody):
    model: Text | None = Field(None, description="The model the sample is for (default: the service's default model).")
    label: Name
    reason: Reason | None = None


class TensorSample(_Sample):
    input: list[Any] = Field(description="One sample of a tensor model's input shape.")


class ImageSample(_Sample):
    image: ImageIn = Field(description="One image, for an image model.")


SampleCreate = TensorSample | ImageSample


class ResolveIn(RequestBody):
    label: Name | None = Field(description="The final label; null discards the item.")
    reason: Reason


class EraseIn(RequestBody):
    reason: Reason = Field(description="E.g. the data-removal request's reference.")


# -- routes -------------------------------------------------------------------------------------


@router.get("/me", response_model=UserPublic)
def me(user: Reviewer) -> UserPublic:
    """Who the token belongs to."""
    return UserPublic(id=user.id, name=user.name, role=user.role)


@router.get("/items", response_model=ItemPage)
def list_items(  # noqa: PLR0917  (each query parameter is an argument, as FastAPI reads them)
    conn: Connection,
    user: Reviewer,
    created_from: Annotated[Instant | None, Query(alias="from")] = None,
    created_to: Annotated[Instant | None, Query(alias="to")] = None,
    model_name: Annotated[Filter | None, Query()] = None,
    model_version: Annotated[Filter | None, Query()] = None,
    label: Annotated[Filter | None, Query(description="The model's label.")] = None,
    reviewed_label: Annotated[Filter | None, Query()] = None,
    min_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_confidence: Annotated[float | None, Query(ge=0, le=1)] = None,
    status: Status | None = None,
    reviewer: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    sort: rs.SortKey = rs.SortKey.TIME,
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512, pattern=NO_NUL)] = None,
) -> ItemPage:
    """Predictions and added samples, filtered, in a stable keyset order."""
    filters = rs.ItemFilter(
        created_from=created_from,
        created_to=created_to,
        model_name=model_name,
        model_version=model_version,
        label=label,
        reviewed_label=reviewed_label,
        min_confidence=min_confidence,
        max_confidence=max_confidence,
        status=status,
        reviewer=reviewer,
        sort=sort,
        descending=order == "desc",
    )
    page = rs.list_items(conn=conn, filters=filters, limit=limit, cursor=cursor)
    return ItemPage(items=[ItemPublic(**asdict(i)) for i in page.items], next_cursor=page.next_cursor)


@router.get("/counts")
def counts(
    conn: Connection,
    user: Reviewer,
    created_from: Annotated[Instant | None, Query(alias="from")] = None,
    created_to: Annotated[Instant | None, Query(alias="to")] = None,
    model: Annotated[Filter | None, Query(description="Only this model's items.")] = None,
) -> dict[str, Any]:
    """Moderated and unmoderated per model version and day, verdicts, accuracy as judged."""
    return rs.counts(conn=conn, created_from=created_from, created_to=created_to, model_name=model)


@router.post("/claim", response_model=list[ClaimedPublic])
def claim(context: Context, conn: Connection, user: Reviewer, body: ClaimIn) -> list[ClaimedPublic]:
    """Lease a page of items to review; nobody else gets them unless they need more reviews. A
    reviewer holds at most the service's lease limit at once (409 beyond: judge some first)."""
    claimed = rs.claim(
        conn=conn,
        user=user,
        count=body.count,
        strategy=body.strategy,
        lease_seconds=body.lease_seconds or context.lease_seconds,
        max_leases=context.max_leases,
        overlap=context.overlap,
        overlap_share=context.overlap_share,
        filters=body.filters(),
        mixed_share=context.mixed_share,
        gold_share=context.gold_share,
        drifted=drifted_segments(conn) if body.strategy is rs.Strategy.DRIFT else (),
    )
    return [_claimed(context, c) for c in claimed]


def _claimed(context: ModerationContext, c: rs.Claimed) -> ClaimedPublic:
    names = (context.labels_of or (lambda _: context.labels()))(c.model_name) or ()
    ranked = sorted(zip(names, c.scores, strict=False), key=lambda pair: -pair[1])[:3]
    return ClaimedPublic(
        id=c.prediction_id,
        created_at=c.created_at,
        model_name=c.model_name,
        model_version=None if c.blind else c.model_version,
        label=c.label,
        confidence=c.confidence,
        blind=c.blind,
        input=input_json(c.input, c.input_type),
        lease_expires_at=c.expires_at,
        required_reviews=c.required_reviews,
        top=[Score(label=label, score=score) for label, score in ranked],
    )


@router.post("/undo", response_model=ClaimedPublic)
def undo(context: Context, conn: Connection, user: Reviewer, body: UndoIn) -> ClaimedPublic:
    """Take back your latest verdict on an item while its lease would still be live (409 when
    someone annotated it since, or it is too late); the item is leased to you again."""
    again = rs.undo(conn=conn, user=user, prediction_id=body.prediction_id, lease_seconds=context.lease_seconds)
    return _claimed(context, again)


@router.post("/verdicts", response_model=list[ItemStatePublic])
def verdicts(context: Context, conn: Connection, user: Reviewer, body: VerdictsIn) -> list[ItemStatePublic]:
    """Verdicts on items you hold, all or none (409 if any lease is missing or expired)."""
    items = [
        rs.VerdictIn(
            prediction_id=v.prediction_id, verdict=Verdict(v.verdict), label=getattr(v, "label", None), reason=v.reason
        )
        for v in body.verdicts
    ]
    labels_of = context.labels_of or (lambda _: context.labels())
    states = rs.record_verdicts(conn=conn, user=user, verdicts=items, labels_of=labels_of)
    return [ItemStatePublic(**asdict(s)) for s in states]


@router.post("/samples", response_model=ItemStatePublic, status_code=201)
def add_sample(context: Context, conn: Connection, user: Reviewer, body: SampleCreate) -> ItemStatePublic:
    """Add a sample a model missed, with its label: numbers for a tensor model, an image (base64)
    for an image model. It enters the pool as reviewed."""
    model = body.model or context.model_name
    labels = (context.labels_of or (lambda _: context.labels()))(model)
    if labels is not None and body.label not in labels:
        raise Invalid(f"unknown label {body.label!r} for {model}; labels are {', '.join(labels)}")
    if context.to_input is None:
        raise Unavailable("no model is loaded to check the sample against")
    try:
        given: Any = (
            body.input if isinstance(body, TensorSample) else base64.b64decode(body.image.base64, validate=True)
        )
    except binascii.Error:
        raise Invalid("image.base64 is not valid base64") from None
    stored, media_type = context.to_input(model, given)  # NotFound, Invalid
    state = rs.add_sample(
        conn=conn,
        user=user,
        model_name=model,
        input=stored,
        input_type=media_type,
        label=body.label,
        reason=body.reason,
    )
    return ItemStatePublic(**asdict(state))


@router.get("/items/{prediction_id}/history")
def item_history(conn: Connection, user: Reviewer, prediction_id: ItemId) -> list[dict[str, Any]]:
    """Every annotation revision of an item, oldest first."""
    return rs.history(conn=conn, prediction_id=prediction_id)


@router.post("/items/{prediction_id}/resolve", response_model=ItemStatePublic)
def resolve(conn: Connection, user: Admin, prediction_id: ItemId, body: ResolveIn) -> ItemStatePublic:
    """Settle an item (a dispute, usually) with a final label, or discard it (admin)."""
    state = rs.resolve(conn=conn, user=user, prediction_id=prediction_id, label=body.label, reason=body.reason)
    return ItemStatePublic(**asdict(state))


@router.post("/items/{prediction_id}/erase", status_code=204)
def erase(conn: Connection, user: Admin, prediction_id: ItemId, body: EraseIn) -> None:
    """Erase an item's input for a data-removal request; the audit trail keeps the erasure (admin)."""
    rs.erase_input(conn=conn, user=user, prediction_id=prediction_id, reason=body.reason)


@router.get("/agreement")
def agreement_figures(conn: Connection, user: Reviewer) -> dict[str, Any]:
    """Cohen's kappa per reviewer pair, Fleiss' kappa, disagreements, per-reviewer figures."""
    rows = rs.opinions(conn=conn)
    finals = rs.final_labels(conn=conn, ids=list({r[0] for r in rows}))
    report = agreement(
        [Opinion(str(r[0]), r[1], r[2], r[3], Verdict(r[4]), r[5]) for r in rows],
        {str(k): v for k, v in finals.items()},
    )
    return asdict(report)


@router.get("/audit")
def audit(
    conn: Connection,
    user: Admin,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="Entries older than this id.")] = None,
) -> list[dict[str, Any]]:
    """The audit log, newest first (admin)."""
    return rs.audit_log(conn=conn, limit=limit, before=before)


@router.get("/users", response_model=list[UserPublic])
def users(conn: Connection, user: Admin) -> list[UserPublic]:
    """Every user (admin)."""
    return [UserPublic(id=u.id, name=u.name, role=u.role) for u in rs.list_users(conn=conn)]


@router.post("/users", response_model=UserCreated, status_code=201)
def create_user(conn: Connection, user: Admin, body: UserCreate) -> UserCreated:
    """Create a reviewer or admin; the token is in this answer only (admin)."""
    created, token = rs.create_user(conn=conn, name=body.name, role=body.role, actor=user)
    return UserCreated(id=created.id, name=created.name, role=created.role, token=token)
