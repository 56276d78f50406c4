"""What the prediction faces share: the data plane of the worker, the body of `POST /predict`,
the answer headers and the request id. A refusal is raised (`feedback.errors`) and answered by
`service.problems`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from service.predictions import Predictions
from service.routes.fields import ModelName, TagKey, TagValue
from service.schemas import EXAMPLE_INPUT, PredictResponse

# One sample as JSON: numbers nested to the model's input shape (four axes at most), or the base64
# text of an image. The served model decides which, and the shape: GET /models says.
_NUMBERS: dict[str, Any] = {"type": "number"}
for _ in range(4):
    _NUMBERS = {"anyOf": [{"type": "number"}, {"type": "array", "minItems": 1, "items": _NUMBERS}]}
_SAMPLE_SCHEMA = {"anyOf": [*_NUMBERS["anyOf"], {"type": "string", "minLength": 1, "format": "byte"}]}


class PredictRequest(BaseModel):
    """The body of POST /predict: only these members."""

    model_config = ConfigDict(extra="forbid")

    samples: Annotated[
        list[Any],
        Field(
            min_length=1,
            description="Samples to classify: for tensor models, each of the model's input shape "
            "(see GET /models); for image models, base64 text of each image (or upload files instead).",
            examples=[[EXAMPLE_INPUT]],
            json_schema_extra={"items": _SAMPLE_SCHEMA},
        ),
    ]
    # Either member may be left out, but not sent as null: the schema says a string, an object.
    tags: Annotated[
        dict[TagKey, TagValue],
        Field(
            default=None,
            max_length=16,
            description="Client labels stored with each prediction.",
            examples=[{"app": "scanner"}],
        ),
    ]
    model: Annotated[
        ModelName,
        Field(default=None, description="The served model to ask (see GET /models); default: the first one."),
    ]


def _plane(request: Request) -> Predictions:
    plane: Predictions = request.app.state.predictions
    return plane


Plane = Annotated[Predictions, Depends(_plane)]


def answer_headers(request: Request, request_id: str) -> dict[str, str]:
    return {"X-Request-ID": request_id, "X-Loop-Worker": request.app.state.worker}


def answered(request: Request, response: PredictResponse) -> Response:
    """Predictions as JSON, with the request id and the worker that answered."""
    return Response(
        response.model_dump_json(), media_type="application/json", headers=answer_headers(request, response.request_id)
    )


def request_id_of(headers: Mapping[str, str]) -> str:
    return chosen_request_id(headers.get("x-request-id"))


def chosen_request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is short printable text, else a new one."""
    if given and len(given) <= 128 and given.isprintable():
        return given
    return uuid.uuid4().hex
