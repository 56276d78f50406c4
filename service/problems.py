"""Every error the service answers, in one format: RFC 9457 problem details.

`application/problem+json` with `type` (`about:blank`: the status says it all), `title` (the
status's phrase), `status`, `detail` (what was wrong, in words a client can act on) and, for an
invalid request body or query, `errors`: each field and its problem. The Open Inference Protocol's
clients read `error`, so its routes carry that member as well (an RFC 9457 extension member).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM_JSON = "application/problem+json"


class FieldProblem(BaseModel):
    field: str = Field(description="Where: body.samples.0, query.limit, …")
    message: str


class Problem(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str = Field("about:blank", description="about:blank: the status and title say what kind of error.")
    title: str = Field(description="The HTTP status's phrase.", examples=["Bad Request"])
    status: int = Field(examples=[400])
    detail: str = Field(description="What was wrong, and what to do about it.")
    errors: list[FieldProblem] | None = Field(
        None, description="Each invalid field, for a request that fails validation."
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem(
    status: int,
    detail: str,
    *,
    errors: Sequence[Mapping[str, str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": _title(status), "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = [dict(e) for e in errors]
    body.update(extra or {})
    return body


def problem_response(
    status: int,
    detail: str,
    *,
    errors: Sequence[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    return JSONResponse(
        problem(status, detail, errors=errors, extra=extra),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def field_problems(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic's validation errors as (field, message), the input never echoed."""
    return [
        {"field": ".".join(str(p) for p in e.get("loc", ())) or "body", "message": str(e.get("msg", ""))}
        for e in errors
    ]


def validation_response(errors: Iterable[Mapping[str, Any]]) -> JSONResponse:
    fields = field_problems(errors)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    more = f" (and {len(fields) - 5} more)" if len(fields) > 5 else ""
    return problem_response(422, f"the request is not valid: {summary}{more}", errors=fields)


def as_problem(status: int, body: bytes, *, protocol_error: bool = False) -> bytes:
    """Any JSON error body (`{"error": …}`, `{"detail": "…"}`, `{"detail": [field errors]}`, or
    something else) as a problem-details body, for answers the service's own code did not make."""
    try:
        raw = json.loads(body) if body else {}
    except ValueError:
        raw = {}
    if isinstance(raw, dict) and {"type", "title", "status", "detail"} <= raw.keys():
        return body
    detail: Any = raw.get("detail", raw.get("error")) if isinstance(raw, dict) else None
    errors = None
    if isinstance(detail, list):
        errors = field_problems(d for d in detail if isinstance(d, dict))
        detail = "the request is not valid: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    text = detail if isinstance(detail, str) and detail else _title(status)
    return json.dumps(problem(status, text, errors=errors, extra={"error": text} if protocol_error else None)).encode()


# Starlette's router answers these in plain text when no route matches a path (one holding a line
# break, say, which its catch-all mount does not match) or a method.
ROUTING_ERRORS = frozenset({404, 405})


class ProblemDetails:
    """ASGI middleware: an error answer in JSON that is not problem details yet (BentoML's own
    `{"error": …}`, FastAPI's `{"detail": …}` for a route that does not exist), or a routing error
    in plain text, is rewritten as one, so every route answers errors in the same format."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        protocol_error = str(scope.get("path", "")).startswith("/v2/")
        held: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                if message["status"] >= 400:  # a success passes untouched: no header is even looked at
                    given = {k.lower(): v for k, v in message.get("headers", [])}
                    media_type = given.get(b"content-type", b"")
                    if media_type.startswith(b"application/json") or (
                        message["status"] in ROUTING_ERRORS and media_type.startswith(b"text/plain")
                    ):
                        held = message  # answered once the whole body is in
                        return
                await send(message)
                return
            if message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = as_problem(held["status"], b"".join(chunks), protocol_error=protocol_error)
                kept = [
                    (k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")
                ]
                headers = [
                    *kept,
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, each a problem-details body."""
    content = {PROBLEM_JSON: {"schema": _inline(Problem.model_json_schema())}}
    return {status: {"description": _title(status), "content": content} for status in statuses}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its `$defs` written in place: it must stand alone inside any document
    (a `#/$defs/…` reference would point into the OpenAPI document, where there is none)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                return resolve(definitions[reference.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
