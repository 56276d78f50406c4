"""`POST /predict/npy` and `POST /predict/files`: the faces of the data plane for `.npy` bodies and
uploaded images (`POST /predict` with JSON is BentoML's API and the fast path, in `app.py`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from feedback.errors import Malformed, Unsupported
from models.npy import read_npy
from models.signature import InputError
from models.spec import ImageInput
from service.contract import ContractRoute
from service.limits import UPLOAD_ROUTE
from service.predictions import Predictions
from service.problems import documented
from service.routes.faces import Plane, answered, request_id_of
from service.routes.fields import ModelName, TagKey, TagValue
from service.schemas import PredictResponse
from service.serving import ModelSlot

router = APIRouter(route_class=ContractRoute)

_TAGS: TypeAdapter[dict[str, str]] = TypeAdapter(Annotated[dict[TagKey, TagValue], Field(max_length=16)])


@router.post(
    "/predict/npy",
    response_model=PredictResponse,
    responses=documented(400, 404, 413, 415, 422, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "One .npy array: N samples of the model's input shape, or one sample.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def predict_npy(request: Request, plane: Plane, model: Annotated[ModelName | None, Query()] = None) -> Any:
    """Classify samples sent as one .npy array (N x input shape, or one sample): no JSON to parse."""
    request_id = request_id_of(request.headers)
    body = await request.body()  # bounded by `RequestLimits` before it is read
    try:
        array = read_npy(body)
    except InputError as exc:
        raise Malformed(str(exc)) from None
    return answered(request, await plane.classify_array(model, array, request_id))


@router.post(
    UPLOAD_ROUTE,
    response_model=PredictResponse,
    responses=documented(400, 404, 413, 415, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["files"],
                        "properties": {
                            "files": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "string", "format": "binary"},
                                "description": "One file part per image (any part name).",
                            },
                            "model": {"type": "string", "description": "The served model to ask."},
                            "tags": {"type": "string", "description": "A JSON object of client labels."},
                        },
                    }
                }
            },
        }
    },
)
async def predict_files(request: Request, plane: Plane) -> Any:
    """Classify uploaded images (multipart/form-data: one file part per image; optional fields
    `model` and `tags`, a JSON object). `POST /predict` with a multipart body lands here too."""
    request_id = request_id_of(request.headers)
    slot, spec, images, tags = await read_upload(request, plane)
    return answered(request, await plane.classify_images(slot, spec, images, tags, request_id))


async def read_upload(
    request: Request, plane: Predictions
) -> tuple[ModelSlot, ImageInput, list[bytes], dict[str, str]]:
    """The files, tags and model of an upload, checked; the form's files are closed after."""
    try:
        form = await request.form(max_files=plane.max_samples, max_fields=8, max_part_size=64 * 1024)
    except (HTTPException, MultiPartException, AssertionError, KeyError, ValueError) as exc:
        # Starlette says "too many files", "missing boundary" and the like with an HTTPException.
        detail = exc.detail if isinstance(exc, HTTPException) else getattr(exc, "message", None) or str(exc)
        raise Malformed(f"the form cannot be read: {detail or type(exc).__name__}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        try:
            tags = _form_tags(fields.get("tags"))
        except ValueError as exc:
            raise Malformed(str(exc)) from None
        slot = plane.slot(fields.get("model") or None)
        served = await plane.ready(slot)
        spec = served.stored.card.model_spec.input
        if not isinstance(spec, ImageInput):
            raise Unsupported(
                f"{slot.name} takes numbers as JSON (application/json) on POST /predict, not uploaded files"
            )
        if not files:
            raise Malformed("the form has no files: send each image as a file part")
        return slot, spec, [await f.read() for f in files], tags
    finally:
        await form.close()


def _form_tags(raw: str | None) -> dict[str, str]:
    if not raw:  # no field, or an empty one: no tags
        return {}
    try:
        return _TAGS.validate_json(raw)
    except ValidationError as exc:
        raise ValueError(
            f"the tags field is not a JSON object of at most 16 short strings: {exc.errors()[0]['msg']}"
        ) from None
