"""Label Studio's ML backend interface, one per served model under `/label-studio/{model}`: a
project connects the model by that URL. `/health`, `/setup` (the project's choices must be the
model's classes) and `/predict` (its tasks answered as predictions, each stored like any other)
need no token, as `/predict` does not; `/webhook` records annotations as verdicts and takes an
admin's token (`Authorization: Bearer`, a header the project's webhook is given)."""

from __future__ import annotations

import asyncio
import logging
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from feedback.errors import Invalid, Unavailable, Unsupported
from feedback.review import label_studio as ls
from models.spec import ImageInput
from service.fetching import Fetcher
from service.predictions import Predictions
from service.problems import documented
from service.routes.dependencies import Admin, Connection, Context, GuardedRoute
from service.routes.faces import Plane, request_id_of
from service.routes.fields import Integer, ModelName
from service.serving import ModelSlot

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/label-studio/{model}", tags=["label-studio"], route_class=GuardedRoute)

MAX_TASKS = 256  # tasks in one /predict call


class ForeignBody(BaseModel):
    """A body Label Studio sends: the members read here are checked; others (it adds some from
    release to release) are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class SetupIn(ForeignBody):
    label_config: str = Field(alias="schema", max_length=ls.MAX_CONFIG_CHARS, description="The labelling config.")
    project: str | None = Field(None, max_length=200)


class TaskIn(ForeignBody):
    id: Integer = Field(description="Label Studio's task id.")
    data: dict[str, Any] = Field(description="The task's data; the labelled tag's member names the image.")


class PredictIn(ForeignBody):
    tasks: list[TaskIn] = Field(min_length=1, max_length=MAX_TASKS)
    label_config: str | None = Field(None, max_length=ls.MAX_CONFIG_CHARS)
    project: str | None = Field(None, max_length=200)


class WebhookIn(ForeignBody):
    action: str = Field(
        max_length=64,
        description="ANNOTATION(S)_CREATED, ANNOTATION_UPDATED and "
        "ANNOTATIONS_DELETED are recorded; other actions are acknowledged and ignored.",
    )
    annotation: dict[str, Any] | list[dict[str, Any]] | None = None
    annotations: list[dict[str, Any]] | None = None
    task: dict[str, Any] | list[dict[str, Any]] | None = None
    project: dict[str, Any] | None = None


async def _served(plane: Predictions, model: str) -> tuple[ModelSlot, ImageInput, tuple[str, ...], str]:
    slot = plane.slot(model)
    served = await plane.ready(slot)
    spec = served.stored.card.model_spec.input
    if not isinstance(spec, ImageInput):
        raise Unsupported(f"{model} takes numbers; a Label Studio project labels images")
    version = f"{served.stored.name}:{served.stored.version}"
    return slot, spec, tuple(served.stored.card.signature.class_names), version


@lru_cache(maxsize=64)
def _config(text: str) -> ls.LabelConfig:
    return ls.parse_config(text)


def _fetcher(request: Request) -> Fetcher:
    fetcher: Fetcher | None = getattr(request.app.state, "fetcher", None)
    if fetcher is None:
        raise Unavailable("the service is starting")
    return fetcher


@router.get("/health", responses=documented(404))
@router.get("", responses=documented(404), include_in_schema=False)
async def label_studio_health(model: ModelName, plane: Plane) -> Any:
    """Up, and which model version answers (what Label Studio's health check reads)."""
    slot = plane.slot(model)
    served = slot.served
    return {"status": "UP", "model": model, "model_version": None if served is None else served.stored.version}


@router.post("/setup", responses=documented(400, 404, 415, 422, 503))
async def label_studio_setup(model: ModelName, body: SetupIn, plane: Plane) -> Any:
    """Connect a project: its one `<Choices>` must offer exactly the model's classes."""
    _, _, classes, version = await _served(plane, model)
    ls.check_config(_config(body.label_config), model, classes)
    return {"model_version": version}


@router.post("/predict", responses=documented(400, 404, 413, 415, 422, 429, 503))
async def label_studio_predict(model: ModelName, body: PredictIn, request: Request, plane: Plane) -> Any:
    """Answer tasks: each task's image is classified and stored as a prediction tagged with the
    task's id; the answer is Label Studio's predictions (the label, score = confidence)."""
    slot, spec, classes, version = await _served(plane, model)
    config = _config(body.label_config) if body.label_config else ls.LabelConfig.default(classes)
    ls.check_config(config, model, classes)
    fetcher = _fetcher(request)
    request_id = request_id_of(request.headers)

    async def one(task: TaskIn) -> dict[str, Any]:
        reference = task.data.get(config.data_key)
        if not isinstance(reference, str):
            raise Invalid(f"task {task.id} has no {config.data_key!r} in its data (the image {config.to_name} shows)")
        try:
            image = await fetcher.read(reference)
        except Invalid as exc:
            raise type(exc)(f"task {task.id}: {exc}") from None
        tags = {ls.TASK_TAG: str(task.id)} | ({ls.PROJECT_TAG: body.project[:200]} if body.project else {})
        answer = (await plane.classify_images(slot, spec, [image], tags, request_id)).predictions[0]
        return ls.prediction(config, label=answer.label, confidence=answer.confidence, model_version=version)

    results = await asyncio.gather(*(one(t) for t in body.tasks))
    return {"results": list(results), "model_version": version}


@router.post("/webhook", responses=documented(400, 401, 403, 404, 422, 503))
def label_studio_webhook(model: ModelName, body: WebhookIn, conn: Connection, context: Context, admin: Admin) -> Any:
    """Annotation events as verdicts of the reviewer `label-studio.<user id>`: created or updated
    -> a verdict (when the label changed), deleted -> their opinion taken back."""
    labels_of = context.labels_of or (lambda name: None)
    outcomes: list[str] = []
    if body.action in ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"):
        annotations = body.annotation if isinstance(body.annotation, list) else [body.annotation or {}]
        tasks = body.task if isinstance(body.task, list) else [body.task or {}]
        by_id = {t.get("id"): t for t in tasks}
        for annotation in annotations:
            task = by_id.get(annotation.get("task"), tasks[0] if len(tasks) == 1 else {})
            read = ls.LabelStudioAnnotation.read(annotation, task, None)
            outcomes.append(ls.record(conn, read, actor=admin, model=model, labels_of=labels_of).value)
    elif body.action == "ANNOTATIONS_DELETED":
        for annotation in body.annotations or []:
            if not isinstance(annotation.get("id"), int):
                raise Invalid("ANNOTATIONS_DELETED lists annotations by their integer id")
            outcomes.append(ls.withdraw(conn, annotation["id"]).value)
    else:
        return {"action": body.action, "ignored": True}
    logger.info("Label Studio %s for %s: %s", body.action, model, outcomes)
    return {"action": body.action, "outcomes": outcomes}
