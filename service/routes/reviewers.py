"""Per-reviewer quality for admins: `GET /admin/reviewers` (each reviewer's figures over a period,
flagged against the targets) and `PUT /admin/reviewers/targets`."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from feedback.errors import Invalid
from feedback.review import quality
from service.problems import documented
from service.routes.dependencies import Admin, Connection, GuardedRoute, RequestBody
from service.routes.fields import Instant, Number

router = APIRouter(
    prefix="/admin", tags=["admin"], route_class=GuardedRoute, responses=documented(400, 401, 403, 413, 422, 429, 503)
)


class TargetsIn(RequestBody):
    min_per_day: Number | None = Field(None, ge=0, description="Verdicts per active day, at least")
    max_median_seconds: Number | None = Field(None, ge=0, description="Median seconds from lease to verdict, at most")
    min_agreement: Number | None = Field(None, ge=0, le=1, description="Agreement with the settled label, at least")
    max_undo_rate: Number | None = Field(None, ge=0, le=1, description="Undos per verdict, at most")
    max_discard_rate: Number | None = Field(None, ge=0, le=1, description="Discards per verdict, at most")


class TargetsPublic(BaseModel):
    min_per_day: float | None
    max_median_seconds: float | None
    min_agreement: float | None
    max_undo_rate: float | None
    max_discard_rate: float | None


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
    """Each reviewer's figures over the period, each against the targets (those beyond are flagged)."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=30)
    if since >= until:
        raise Invalid(f"since ({since}) must be before until ({until})")
    targets = quality.get_targets(conn=conn)
    found = quality.reviewer_quality(conn=conn, since=since, until=until, targets=targets)
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
