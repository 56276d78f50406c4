"""Every error the service answers, in one format and from one table: RFC 9457 problem details.

The data plane, the stores and the routes raise domain exceptions (`feedback.errors`); `STATUSES`
maps each class to its HTTP status, and `answer` (a response) or `encoded` (its bytes, for the
layers below Starlette) turns one into `application/problem+json` with `type` (`about:blank`: the
status says it all), `title` (the status's phrase), `status`, `detail` (the exception's message,
in words a client can act on) and, for an invalid request, `errors`: each field and its problem.
The Open Inference Protocol's clients read `error`, so its routes carry that member as well (an
RFC 9457 extension member). `install` registers the handlers that do this for a FastAPI app,
including the framework's own errors (validation, routing) and the database's.

`ProblemDetails` reshapes what the frameworks around the app answer by themselves (BentoML's API
dispatch, its router's plain-text 404 and 405): no code of ours builds those.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback.errors import (
    Busy,
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    Malformed,
    NotFound,
    TooLarge,
    Unauthenticated,
    Unavailable,
    Unsupported,
)

PROBLEM_JSON = "application/problem+json"


class FieldProblem(BaseModel):
    field: str = Field(description="Where: body.samples.0, query.limit, …")
    message: str


class Problem(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str = Field("about:blank", description="about:blank: the status and title say what kind of error.")
    title: str = Field(description="The HTTP status's phrase.")
    status: int
    detail: str = Field(description="What was wrong, and what to do about it.")
    errors: list[FieldProblem] | None = Field(
        None, description="Each invalid field, for a request that fails validation."
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class MethodNotAllowed(DomainError):
    """A method the path does not take; `allowed`: the ones it does."""

    def __init__(self, message: str, allowed: Iterable[str]) -> None:
        super().__init__(message)
        self.allowed = sorted(allowed)


class HeadTooLarge(TooLarge):
    """A request line and headers over the limit (answered below the application, as bytes)."""


# Each domain error's status: the first class in this order that the exception is an instance of.
STATUSES: tuple[tuple[type[DomainError], int], ...] = (
    (Malformed, 400),
    (Unsupported, 415),
    (HeadTooLarge, 431),
    (TooLarge, 413),
    (Invalid, 422),
    (Unauthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (MethodNotAllowed, 405),
    (Conflict, 409),
    (Busy, 429),
    (Unavailable, 503),
)
FAILED = "the service failed to answer; its log says why"  # the detail of a 500: a bug, never a domain error


def status_of(exc: BaseException) -> int:
    if isinstance(exc, _FrameworkError):
        return exc.status
    for kind, status in STATUSES:
        if isinstance(exc, kind):
            return status
    return 500


def _headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, Busy):
        return {"Retry-After": "1"}
    if isinstance(exc, MethodNotAllowed):
        return {"Allow": ", ".join(exc.allowed)}
    return {}


def _body(status: int, detail: str, *, errors: Sequence[Mapping[str, str]] | None, v2: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": _title(status), "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = [dict(e) for e in errors]
    if v2:
        body["error"] = detail  # the Open Inference Protocol's member
    return body


def _content(exc: BaseException, *, v2: bool) -> tuple[int, dict[str, Any]]:
    status = status_of(exc)
    detail = str(exc) if status != 500 else FAILED
    fields = exc.fields if isinstance(exc, Invalid) else None
    return status, _body(status, detail, errors=fields, v2=v2)


def answer(exc: BaseException, *, v2: bool = False) -> JSONResponse:
    """The problem-details response to `exc` (a domain error; anything else is a 500)."""
    status, body = _content(exc, v2=v2)
    return JSONResponse(body, status_code=status, headers=_headers(exc), media_type=PROBLEM_JSON)


def encoded(exc: BaseException, *, v2: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """`answer` as the status, headers (content-type included, not content-length) and body bytes."""
    status, body = _content(exc, v2=v2)
    headers = [(b"content-type", PROBLEM_JSON.encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in _headers(exc).items()]
    return status, headers, json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def field_problems(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic's validation errors as (field, message), the input never echoed."""
    return [
        {"field": ".".join(str(p) for p in e.get("loc", ())) or "body", "message": str(e.get("msg", ""))}
        for e in errors
    ]


def invalid_request(errors: Iterable[Mapping[str, Any]]) -> Invalid:
    """pydantic's validation errors as one `Invalid` naming (at most five of) the fields."""
    fields = field_problems(errors)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    more = f" (and {len(fields) - 5} more)" if len(fields) > 5 else ""
    return Invalid(f"the request is not valid: {summary}{more}", fields=fields)


def as_domain(exc: Exception) -> DomainError:
    """What a framework or the database raised, as the domain error it means."""
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, RequestValidationError):
        return invalid_request(exc.errors())
    if isinstance(exc, psycopg.DataError):  # a value Postgres cannot hold, e.g. text with a NUL byte
        return Invalid(f"invalid value: {exc}")
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):  # a statement timeout included
        return Unavailable(f"database unavailable: {exc}")
    if isinstance(exc, HTTPException):  # the framework's own (no route for a path): its status kept
        return _FrameworkError(exc.status_code, str(exc.detail))
    raise TypeError(f"not an error the service answers: {exc!r}") from exc


class _FrameworkError(DomainError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


HANDLED = (DomainError, RequestValidationError, HTTPException, psycopg.DataError, psycopg.OperationalError, PoolTimeout)


def install(app: FastAPI) -> None:
    """Answer every error the app's routes raise (domain, validation, database, routing) from
    the table above; the Open Inference Protocol's routes with its `error` member too."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return answer(as_domain(exc), v2=request.url.path.startswith("/v2/"))

    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        """405 with every method the path takes in `Allow` (Starlette names only the first route's)."""
        allowed: set[str] = set()
        for route in request.app.router.routes:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                allowed |= set(getattr(route, "methods", None) or ())
        message = f"{request.method} is not a method of {request.url.path}; it takes {', '.join(sorted(allowed))}"
        return answer(MethodNotAllowed(message, allowed), v2=request.url.path.startswith("/v2/"))

    for kind in HANDLED:
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(405, method_not_allowed)


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
    return json.dumps(_body(status, text, errors=errors, v2=protocol_error)).encode()


# Starlette's router answers these in plain text when no route matches a path (one holding a line
# break, say, which its catch-all mount does not match) or a method.
ROUTING_ERRORS = frozenset({404, 405})


class ProblemDetails:
    """ASGI middleware: an error the frameworks around the app answer themselves, in JSON that is
    not problem details (BentoML's `{"error": …}` for a body its API refuses) or as a routing error
    in plain text (its router's 404 and 405), is rewritten as problem details, so every route
    answers errors in the same format. What the app raises is answered by `install`'s handlers."""

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
    schema = _inline(Problem.model_json_schema())
    return {
        status: {
            "description": _title(status),
            "content": {
                PROBLEM_JSON: {
                    "schema": schema,
                    "example": _body(status, _EXAMPLES.get(status, _title(status)), errors=None, v2=False),
                }
            },
        }
        for status in statuses
    }


_EXAMPLES = {  # what a client reads in `detail`, one per status the service answers
    400: "samples[0] has shape (27, 28), the model takes (28, 28)",
    401: "send Authorization: Bearer <token>",
    403: "this needs the admin role",
    404: "no prediction 01890a5d-ac96-774b-bcce-b302099a8057",
    405: "DELETE is not a method of /models; it takes GET",
    409: "you hold no live lease on this item",
    413: "the body is over the limit of 8388608 bytes for this route",
    415: "digits takes numbers as JSON (application/json) on POST /predict, not uploaded files",
    422: "the request is not valid: body.label: Field required",
    429: "this worker has 64 requests in hand, its most; try again in a moment",
    503: "not ready: the model is loading",
}


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
