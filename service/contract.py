"""The API contract: what the OpenAPI schema says is what the service accepts, and every status
it answers is in it, as problem details.

- The field types every route uses are in `service.routes.fields`, each written once.
- `ContractRoute`, the class of every FastAPI route of the service: a query parameter the route
  does not take is refused (422, naming it).
- `finish_openapi` (served by the `OpenAPIContract` middleware): the schema BentoML writes for its
  own operations (`POST /predict`) documents the problem details they answer, not BentoML's
  error models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback.errors import Invalid
from service.problems import documented


class ContractRoute(APIRoute):
    """A route that takes only the query parameters it declares (FastAPI ignores unknown ones):
    any other is refused (422, naming it). Its errors are answered by `service.problems`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = _query_parameters(self.dependant)

        async def checked(request: Request) -> Response:
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                takes = ", ".join(sorted(known)) or "none"
                fields = [{"field": f"query.{name}", "message": "unknown query parameter"} for name in unknown]
                raise Invalid(f"unknown query parameter {', '.join(unknown)}; this route takes: {takes}", fields=fields)
            return await handler(request)

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


__all__ = ["ContractRoute", "OpenAPIContract", "finish_openapi"]
