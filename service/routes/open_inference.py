"""The Open Inference Protocol's routes (KServe v2 REST): server and model metadata, health, and
inference through the same data plane as `POST /predict`. Messages are read and written by
`service.routes.v2`; every refusal is problem details with the protocol's `error` member
(`service.problems` adds it under `/v2/`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from fastapi import APIRouter
from numpy.typing import NDArray
from starlette.requests import Request
from starlette.responses import Response

from feedback.errors import Malformed, Unavailable
from models.images import ImageError
from models.provenance import code_version
from models.signature import InputError, to_batch
from models.spec import ImageInput
from service.contract import ContractRoute
from service.predictions import Images, Predictions, base64_images
from service.problems import documented
from service.routes import v2
from service.routes.faces import Plane, answer_headers, request_id_of
from service.routes.fields import ModelName, ModelVersion
from service.serving import ModelSlot, Served

router = APIRouter(route_class=ContractRoute, tags=["v2"])

_READY: dict[int | str, dict[str, Any]] = {200: {"description": "Ready"}, **documented(404, 422, 503)}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(v2.DATATYPES)},
        "parameters": {"type": "object"},
        "data": {"type": "array", "description": "The tensor's elements, flat or nested (JSON tensors)."},
    },
}
_INFER: dict[str, Any] = {
    "responses": {
        200: {
            "description": "Probabilities and labels; the prediction ids in `parameters.prediction_ids`",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **documented(400, 404, 413, 415, 429, 503),
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "An inference request (JSON tensors, or a JSON header followed by binary data "
            "with Inference-Header-Content-Length).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "parameters": {"type": "object"},
                            "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
                            "outputs": {"type": "array", "items": {"type": "object"}},
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


def _loaded(plane: Predictions, name: str, version: str | None) -> tuple[ModelSlot, Served]:
    """The model (and version) loaded here, or the protocol's 404 naming those that are."""
    return plane.loaded(name, version, unknown=f"unknown model {name!r}; served: {', '.join(plane.slots)}")


def _served(plane: Predictions, name: str, version: str | None) -> Served:
    return _loaded(plane, name, version)[1]


EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]


@router.get("/v2")
def v2_server() -> Any:
    """Server metadata: name, version and the protocol extensions it speaks."""
    return {"name": "loop", "version": code_version(), "extensions": EXTENSIONS}


# Before `/v2/models/{name}`, which would take "stats" for a model's name.
@router.get("/v2/models/stats", responses=documented(404, 422, 503))
@router.get("/v2/models/{name}/stats", responses=documented(404, 422, 503))
@router.get("/v2/models/{name}/versions/{version}/stats", responses=documented(404, 422, 503))
def v2_statistics(plane: Plane, name: ModelName | None = None, version: ModelVersion | None = None) -> Any:
    """The statistics extension: each version's requests, samples and model calls, and where their
    time went (queue, compute input, infer and output), summed over the service's workers. Versions are
    numbered as Triton numbers them (the model's oldest stored version is 1)."""
    names = list(plane.slots) if name is None else [_served(plane, name, version).stored.name]
    others = plane.other_statistics()
    reported = []
    for model in names:
        served = plane.slots[model].served
        versions = plane.statistics.versions(model, others)
        if served is not None and served.stored.version not in versions:
            versions.append(served.stored.version)
        if version is not None:
            versions = [served.stored.version] if served is not None else []
        for v in versions:
            number = plane.version_number(model, v)
            reported.append((model, v, v if number is None else str(number)))
    return {"model_stats": plane.statistics.report(reported, others)}


@router.get("/v2/health/live", response_class=Response, responses={200: {"description": "Live"}})
def v2_live() -> Any:
    """200 while the worker runs."""
    return Response(status_code=200)


@router.get("/v2/health/ready", response_class=Response, responses={200: {"description": "Ready"}, **documented(503)})
def v2_ready(request: Request) -> Any:
    """200 once every model is loaded and predictions can be kept."""
    if not request.app.state.is_ready():
        raise Unavailable("not ready")
    return Response(status_code=200)


@router.get("/v2/models/{name}", responses=documented(404, 422, 503))
@router.get("/v2/models/{name}/versions/{version}", responses=documented(404, 422, 503))
def v2_model(plane: Plane, name: ModelName, version: ModelVersion | None = None) -> Any:
    """Model metadata: platform, versions, inputs and outputs (-1 is the batch axis)."""
    served = _served(plane, name, version)
    card = served.stored.card
    spec = card.model_spec
    image = isinstance(spec.input, ImageInput)
    return {
        "name": served.stored.name,
        "versions": [served.stored.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {
                "name": spec.onnx_input,
                "datatype": "BYTES" if image else "FP32",
                # An image a row, as Triton declares a batch of strings (dims [1]); [N] is taken too.
                "shape": [-1, 1] if image else [-1, *card.signature.input_shape],
            }
        ],
        "outputs": [
            {"name": v2.SCORES, "datatype": "FP32", "shape": [-1, len(spec.classes)]},
            {"name": v2.LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
    }


@router.get("/v2/models/{name}/config", responses=documented(404, 422, 503))
@router.get("/v2/models/{name}/versions/{version}/config", responses=documented(404, 422, 503))
def v2_model_config(plane: Plane, name: ModelName, version: ModelVersion | None = None) -> Any:
    """The model configuration extension: the model as Triton's configuration describes it (what
    perf_analyzer and other Triton tools read): the batch axis, inputs, outputs, dynamic batching."""
    slot, served = _loaded(plane, name, version)
    spec, signature = served.stored.card.model_spec, served.stored.card.signature
    image_input = {"data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}  # one encoded image a row
    tensor_input = {"data_type": "TYPE_FP32", "dims": list(signature.input_shape)}
    gpu = served.runtime.provider == "CUDAExecutionProvider"
    return {
        "name": served.stored.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [plane.version_number(name, served.stored.version) or 0]}},
        "max_batch_size": slot.where.max_batch_size,
        "input": [
            {"name": spec.onnx_input, "format": "FORMAT_NONE", "optional": False}
            | (image_input if isinstance(spec.input, ImageInput) else tensor_input)
        ],
        "output": [
            {"name": v2.SCORES, "data_type": "TYPE_FP32", "dims": [len(spec.classes)]},
            {"name": v2.LABEL, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
        ],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": 0,  # no timer: a call takes what waits when the model is free
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": int(slot.where.max_latency_s * 1e6),
            },
        },
        "instance_group": [{"name": served.stored.name, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "default_model_filename": served.stored.onnx_path.name,
    }


@router.get("/v2/models/{name}/ready", response_class=Response, responses=_READY)
@router.get("/v2/models/{name}/versions/{version}/ready", response_class=Response, responses=_READY)
def v2_model_ready(plane: Plane, name: ModelName, version: ModelVersion | None = None) -> Any:
    """200 when that model (and version) is loaded here."""
    _served(plane, name, version)
    return Response(status_code=200)


@router.post("/v2/models/{name}/infer", **_INFER)
@router.post("/v2/models/{name}/versions/{version}/infer", **_INFER)
async def v2_infer(request: Request, plane: Plane, name: ModelName, version: ModelVersion | None = None) -> Any:
    """Inference: JSON or binary tensors in; class probabilities and labels out, and the
    prediction ids (stored like every prediction) in the answer's parameters."""
    body = await request.body()  # bounded by `RequestLimits` before it is read
    inferred = await infer(
        plane, name, version, body, header_length=request.headers.get("inference-header-content-length"),
        headers=request.headers,
    )  # fmt: skip
    headers = answer_headers(request, inferred.request_id)
    if inferred.header_length is None:
        return Response(inferred.content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(inferred.header_length)
    return Response(inferred.content, media_type="application/octet-stream", headers=headers)


@dataclass(frozen=True)
class Inferred:
    content: bytes
    header_length: int | None  # the JSON header's length when binary outputs follow it
    request_id: str


async def infer(
    plane: Predictions,
    name: str,
    version: str | None,
    body: bytes,
    *,
    header_length: str | None,
    headers: Mapping[str, str],
) -> Inferred:
    """An inference request answered: the route's work, and the fast path's (`service.fast_path`)."""
    received = time.perf_counter()
    parsed = v2.parse(body, header_length)
    slot, served = _loaded(plane, name, version)
    batch, sent = await _batch(plane, served, parsed)
    request_id = parsed.id or request_id_of(headers)
    answer = await plane.run(slot, batch, sent, {}, request_id, received=received)
    names = answer.class_names
    content, length = v2.response(
        parsed,
        model_name=answer.served.stored.name,
        model_version=answer.served.stored.version,
        probabilities=answer.outputs.probabilities,
        labels=[names[i] for i in answer.outputs.labels],
        prediction_ids=[str(i) for i in answer.ids],
    )
    return Inferred(content, length, request_id)


async def _batch(
    plane: Predictions, served: Served, request: v2.InferRequest
) -> tuple[NDArray[np.float32], Images | None]:
    """The request's one input, checked like any `/predict` sample."""
    spec = served.stored.card.model_spec
    if len(request.inputs) != 1 or request.inputs[0].name != spec.onnx_input:
        given = [t.name for t in request.inputs]
        raise Malformed(f"{served.stored.name} takes one input named {spec.onnx_input!r}, got {given}")
    (tensor,) = request.inputs
    try:
        if isinstance(spec.input, ImageInput):
            if tensor.datatype != "BYTES" or not tensor.shape or list(tensor.shape[1:]) not in ([], [1]):
                raise InputError(
                    f"input {tensor.name!r} must be BYTES of shape [N] or [N, 1] (encoded images), "
                    f"got {tensor.datatype} {list(tensor.shape)}"
                )
            assert not isinstance(tensor.values, np.ndarray)  # BYTES are a list
            # Binary elements are the images; JSON can only carry them as base64 text.
            images = tensor.values if tensor.binary else base64_images([v.decode("latin-1") for v in tensor.values])
            return await plane.images(spec.input, images)
        if tensor.datatype in ("BYTES", "BOOL") or not isinstance(tensor.values, np.ndarray):
            raise InputError(f"input {tensor.name!r} takes numbers (FP32 or an integer type), not {tensor.datatype}")
        return to_batch(cast(Any, tensor.values), served.stored.card.signature, max_samples=plane.max_samples), None
    except (InputError, ImageError) as exc:
        raise Malformed(str(exc)) from None
