"""Guidelines per model over HTTP: reviewers read the current version and say they did
(`/review/guidelines`); admins publish a new version and read the history (`/admin/guidelines`).
A claim is refused (409) until a reviewer has read the current guidelines of the models it covers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from feedback.review import guidelines as gl
from service.problems import documented
from service.routes.admin import Model
from service.routes.dependencies import Admin, Connection, GuardedRoute, RequestBody, Reviewer
from service.routes.fields import Integer, ModelName

router = APIRouter(
    tags=["review"], route_class=GuardedRoute, responses=documented(400, 401, 403, 404, 413, 422, 429, 503)
)


class GuidelinesPublic(BaseModel):
    model_name: str
    version: int
    markdown: str
    html: str = Field(description="The Markdown rendered (CommonMark; raw HTML in it is escaped).")
    created_by: str | None
    created_at: datetime

    @classmethod
    def of(cls, g: gl.Guidelines) -> GuidelinesPublic:
        fields = {"model_name": g.model_name, "version": g.version, "markdown": g.markdown, "html": g.html}
        return cls(**fields, created_by=g.created_by, created_at=g.created_at)


class ReviewerGuidelines(BaseModel):
    current: GuidelinesPublic | None = Field(description="None: the model has no guidelines")
    read: bool = Field(description="Whether you read the current version (a claim needs it)")
    unread: list[GuidelinesPublic] = Field(description="Every model's current guidelines you have not read yet")


class ReadIn(RequestBody):
    model_name: ModelName
    version: Integer = Field(ge=1)


class PublishIn(RequestBody):
    markdown: Annotated[str, Field(min_length=1, max_length=gl.MAX_CHARACTERS)]


@router.get("/review/guidelines", response_model=ReviewerGuidelines)
def guidelines(user: Reviewer, conn: Connection, model: Model) -> ReviewerGuidelines:
    """A served model's current guidelines (`?model=`, default the default model), and every
    model's that you still have to read."""
    waiting = gl.unread(conn=conn, user=user)
    found = gl.current(conn=conn, model_name=model.name)
    read = found is None or all((g.model_name, g.version) != (found.model_name, found.version) for g in waiting)
    return ReviewerGuidelines(
        current=None if found is None else GuidelinesPublic.of(found),
        read=read,
        unread=[GuidelinesPublic.of(g) for g in waiting],
    )


@router.post("/review/guidelines/read", status_code=204, responses=documented(404))
def read_guidelines(user: Reviewer, conn: Connection, body: ReadIn) -> None:
    """You read that version of the model's guidelines (once is enough)."""
    gl.mark_read(conn=conn, user=user, model_name=body.model_name, version=body.version)


@router.get("/admin/guidelines", response_model=list[GuidelinesPublic], tags=["admin"])
def guidelines_history(admin: Admin, conn: Connection, model: Model) -> list[GuidelinesPublic]:
    """Every version of the model's guidelines, oldest first (`?model=`, default the default model)."""
    return [GuidelinesPublic.of(g) for g in gl.history(conn=conn, model_name=model.name)]


@router.put("/admin/guidelines", response_model=GuidelinesPublic, status_code=201, tags=["admin"])
def publish_guidelines(admin: Admin, conn: Connection, model: Model, body: PublishIn) -> GuidelinesPublic:
    """Publish a new version of a served model's guidelines (`?model=`, default the default model):
    every reviewer reads it before their next claim."""
    return GuidelinesPublic.of(gl.publish(conn=conn, admin=admin, model_name=model.name, markdown=body.markdown))
