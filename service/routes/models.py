"""`GET /models`, `GET /models/{name}` and the stored predictions (`GET /predictions/{id}` and its
input): what this worker serves, and what the log holds."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from feedback.errors import NotFound, Unavailable
from feedback.predictions.records import input_json
from feedback.predictions.store import StoredPrediction
from service.contract import ContractRoute
from service.predictions import Predictions
from service.problems import documented
from service.routes.faces import Plane
from service.routes.fields import ItemId, ModelName
from service.schemas import (
    BatchingPublic,
    ModelPublic,
    ModelsPublic,
    ReferencePublic,
    ShadowPredictionPublic,
    SignaturePublic,
    StoredPredictionPublic,
)
from service.serving import Served

router = APIRouter(route_class=ContractRoute)


@router.get(
    "/predictions/{prediction_id}/input",
    response_class=Response,
    responses={
        200: {
            "description": "The input as sent: an image's own media type, or an array as .npy",
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
            },
        },
        **documented(404, 422, 503),
    },
)
async def prediction_input(plane: Plane, prediction_id: ItemId) -> Any:
    """A stored prediction's input byte for byte: the image as sent, or the array as .npy."""
    row, _ = await plane.find(prediction_id)
    if row.input is None:
        raise NotFound(f"the input of {prediction_id} was erased")
    return Response(row.input, media_type=row.input_type or "application/octet-stream")


@router.get("/models", response_model=ModelsPublic, responses=documented(503))
def models(request: Request, plane: Plane) -> Any:
    """Every model this worker serves (the default first): version, provider, signature."""
    loaded = [slot.served for slot in plane.slots.values() if slot.served is not None]
    waiting = {name: reason for name, slot in plane.slots.items() if (reason := slot.not_ready()) is not None}
    if not loaded:
        raise Unavailable("not ready: " + "; ".join(f"{n}: {r}" for n, r in waiting.items()))
    batching = request.app.state.batching
    return ModelsPublic(
        default=plane.default.name, models=[_model_public(s, batching) for s in loaded], not_ready=waiting
    )


@router.get("/models/{name}", response_model=ModelPublic, responses=documented(404, 422, 503))
def model(request: Request, plane: Plane, name: ModelName) -> Any:
    """One served model: version, provider, signature."""
    slot = plane.slots.get(name)
    if slot is None:
        raise NotFound(f"no model {name!r} is served here; served: {', '.join(plane.slots)}")
    if slot.served is None:
        raise Unavailable(f"not ready: {slot.not_ready()}")
    return _model_public(slot.served, request.app.state.batching)


@router.get("/predictions/{prediction_id}", response_model=StoredPredictionPublic, responses=documented(404, 422, 503))
async def prediction(plane: Plane, prediction_id: ItemId) -> Any:
    """A stored prediction with its input: from Postgres, or from the stream if not yet ingested."""
    return _public(plane, *await plane.find(prediction_id))


def _model_public(served: Served, batching: BatchingPublic) -> ModelPublic:
    card = served.stored.card
    return ModelPublic(
        name=served.stored.name,
        version=served.stored.version,
        provider=served.runtime.provider,
        providers=served.runtime.providers,
        fallback_reason=served.runtime.fallback_reason,
        reference=None if served.reference is None else ReferencePublic(**asdict(served.reference)),
        input_kind=card.model_spec.input.kind,
        signature=SignaturePublic(**card.signature.to_dict()),
        metrics=card.metrics,
        dataset_id=card.dataset_id,
        validation_id=card.validation_id,
        onnx_opset=card.opset,
        code_version=card.code_version,
        batching=batching,
    )


def _public(plane: Predictions, row: StoredPrediction, ingested: bool) -> StoredPredictionPublic:
    names = plane.class_names(row.model_name)

    def named(scores: list[float]) -> dict[str, float] | list[float]:
        """By class name when the model is known here, else in class order."""
        return dict(zip(names, scores, strict=True)) if names is not None and len(names) == len(scores) else scores

    return StoredPredictionPublic(
        id=row.id,
        created_at=row.created_at,
        model_name=row.model_name,
        model_version=row.model_version,
        label=row.label,
        confidence=row.confidence,
        scores=named(list(row.scores)),
        input=None if row.input is None else input_json(row.input, row.input_type),
        input_type=row.input_type,
        request_id=row.request_id,
        tags=row.tags,
        ingested=ingested,
        shadows=[
            ShadowPredictionPublic(
                model_version=s.model_version, label=s.label, confidence=s.confidence, scores=named(s.scores)
            )
            for s in row.shadows
        ],
    )
