"""The API contract: what the OpenAPI schema says is what the service accepts, and every status
it answers is in it, as problem details.

- Types whose schema carries their whole check: `ItemId` (a UUIDv7, as text), `Instant` (an RFC
  3339 date-time, nothing else), `ModelVersion` (a BentoML tag's version), `Number`, `Integer`
  and `Flag` (a body's JSON number, integer and boolean, nothing that merely converts to one).
- `ContractRoute`, the class of every FastAPI route of the service: a query parameter the route
  does not take is refused (422, naming it), and errors are answered as problem details.
- `method_not_allowed`: a 405's `Allow` lists every method of the path, not only those of the
  first route that matched it.
- `finish_openapi` (served by the `OpenAPIContract` middleware): the schema BentoML writes for its
  own operations (`POST /predict`) documents the problem details they answer, not BentoML's
  error models.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BeforeValidator, Strict, WithJsonSchema
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import documented, problem_response, validation_response

NO_NUL = r"^[^\x00]*$"  # text Postgres can hold
UUID7 = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-7[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
RFC3339 = r"^\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$"
TAG_PART = r"^[A-Za-z0-9]([-._A-Za-z0-9]{0,61}[A-Za-z0-9])?$"


def _text_matching(pattern: str, what: str) -> Callable[[Any], Any]:
    compiled = re.compile(pattern)

    def check(value: Any) -> Any:
        if not isinstance(value, str) or compiled.match(value) is None:
            raise ValueError(f"not {what}")
        return value

    return check


ItemId = Annotated[
    uuid.UUID,
    BeforeValidator(_text_matching(UUID7, "a UUIDv7 (a prediction id)")),
    WithJsonSchema({"type": "string", "format": "uuid", "pattern": UUID7}),
]
Instant = Annotated[
    datetime,
    BeforeValidator(_text_matching(RFC3339, "an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z")),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339}),
]
ModelVersion = Annotated[
    str,
    BeforeValidator(_text_matching(TAG_PART, "a model version: letters, digits, '-', '_' and '.', at most 63")),
    WithJsonSchema({"type": "string", "pattern": TAG_PART, "maxLength": 63}),
]
# A JSON body's scalars as JSON types them: no boolean for a number, no numeral in a string.
Number = Annotated[float, Strict()]
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]


class ContractRoute(APIRoute):
    """A route that takes only the query parameters it declares and answers errors as problem
    details (FastAPI's own 422 echoes the input and ignores unknown parameters)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = _query_parameters(self.dependant)

        async def checked(request: Request) -> Response:
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                takes = ", ".join(sorted(known)) or "none"
                errors = [{"field": f"query.{name}", "message": "unknown query parameter"} for name in unknown]
                return problem_response(
                    422, f"unknown query parameter {', '.join(unknown)}; this route takes: {takes}", errors=errors
                )
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_response(exc.errors())
            except HTTPException as exc:
                return problem_response(exc.status_code, str(exc.detail), headers=exc.headers)

        return checked


def _query_parameters(dependant: Dependant) -> set[str]:
    """The names of every query parameter of a route, its dependencies' included."""
    names: set[str] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        names |= {param.alias for param in current.query_params}
        pending.extend(current.dependencies)
    return names


async def method_not_allowed(request: Request, exc: Exception) -> Any:
    """405 with every method the path takes in `Allow` (Starlette names only the first route's)."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            allowed |= set(getattr(route, "methods", None) or ())
    method = request.method
    return problem_response(
        405,
        f"{method} is not a method of {request.url.path}; it takes {', '.join(sorted(allowed))}",
        headers={"Allow": ", ".join(sorted(allowed))},
    )


# -- the schema BentoML writes ---------------------------------------------------------------------

# What BentoML's own operations answer besides 200: the request is not valid (400, or 422 for a
# body field), no such model (404), too large (413), images to a tensor model (415), more requests
# at once than a worker takes (429), not ready or the log is down (503).
_BENTOML_ERRORS = (400, 404, 413, 415, 422, 429, 503)
_FOREIGN_ERROR_MODELS = ("HTTPValidationError", "ValidationError", "InvalidArgument", "NotFound", "InternalServerError")


def _refers_to_foreign_model(response: Any) -> bool:
    text = json.dumps(response)
    return any(f"#/components/schemas/{name}" in text for name in _FOREIGN_ERROR_MODELS)


def finish_openapi(spec: dict[str, Any]) -> dict[str, Any]:
    """Every error response a problem-details body; BentoML's operations document theirs."""
    problems = documented(*_BENTOML_ERRORS)
    for item in spec.get("paths", {}).values():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete") or not isinstance(operation, dict):
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            if "x-bentoml-name" in operation:
                responses.pop("500", None)  # a server error is a bug, not part of the contract
                for status, response in problems.items():
                    responses[str(status)] = response
            for status, response in list(responses.items()):
                if status.isdigit() and int(status) >= 400 and _refers_to_foreign_model(response):
                    responses[status] = documented(int(status))[int(status)]
    schemas = spec.get("components", {}).get("schemas", {})
    still_used = json.dumps(spec.get("paths", {}))
    for name in _FOREIGN_ERROR_MODELS:
        if f"#/components/schemas/{name}" not in still_used:
            schemas.pop(name, None)
    return spec


class OpenAPIContract:
    """ASGI middleware: `GET /docs.json` answers the finished schema (see `finish_openapi`)."""

    def __init__(self, app: ASGIApp, path: str = "/docs.json") -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            assert start is not None
            body = b"".join(chunks)
            if start["status"] == 200:
                body = json.dumps(finish_openapi(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, hold)


__all__ = [
    "NO_NUL",
    "ContractRoute",
    "Flag",
    "Instant",
    "Integer",
    "ItemId",
    "ModelVersion",
    "Number",
    "OpenAPIContract",
    "finish_openapi",
    "method_not_allowed",
]
