"""Prediction requests answered in front of BentoML's ASGI stack.

A worker spent most of a one-digit `POST /predict` in the layers around our handler: BentoML's
middlewares, Starlette's router and BentoML's API dispatch, which binds the method's signature
again for every request (docs/benchmarks.md, "The prediction path's cost"). A bare ASGI handler doing the same
work (the checks, the batcher, the log append) answered about four times as many requests on the
same cores. `FastRoutes` wraps the worker's whole ASGI application and answers the requests it can
answer exactly as the service would: POST to a route a handler has taken (`take`), a body of a
media type it takes and of declared length within the route's limit, no query string unless the
handler reads one, while the worker is under its concurrency limit. The handler may still decline
a request (a body its model refuses); that
request, and every other, goes to BentoML's application unchanged, its body replayed, so every
error is answered as before, by the same code.

BentoML's HTTP metrics, access log and tracing do not see the requests answered here; our own
metrics count and time them (`loop_predictions_total`, `loop_fast_path_request_seconds`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics, problems
from service.limits import WORKER_IN_FLIGHT, InFlight, replay_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # besides content-length

    @classmethod
    def refusing(cls, exc: Exception, *, v2: bool = False) -> Answer:
        """An error as problem details (`v2`: with the protocol's `error`), as the app's handlers answer it."""
        status, headers, body = problems.encoded(exc, v2=v2)
        return cls(status, body, headers)


@dataclass(frozen=True)
class Incoming:
    body: bytes
    headers: Mapping[bytes, bytes]  # lower-case names
    query: bytes  # the query string, as sent
    params: Mapping[str, str]  # the path's parameters (`take`'s {name} parts)
    scope: Scope  # the ASGI scope, for a handler that reads the request with Starlette's own code


# A request -> its answer, or None: not here, answer it as always.
Handler = Callable[[Incoming], Awaitable[Answer | None]]


@dataclass(frozen=True)
class _Route:
    handler: Handler
    max_body_bytes: int
    max_in_flight: int
    media_types: frozenset[bytes]  # the bodies it takes, by media type (b"": none declared)
    query: bool  # whether the handler reads a query string (else a request with one is handed over)
    path: str  # as taken, {parameters} and all: what the metrics name it by


_routes: dict[str, _Route] = {}  # by path
_patterns: dict[str, tuple[re.Pattern[str], _Route]] = {}  # paths with {parameters}, by pattern
_PARAMETER = re.compile(r"\{(\w+)\}")


def take(
    path: str,
    handler: Handler,
    *,
    max_body_bytes: int,
    max_in_flight: int,
    media_types: tuple[bytes, ...] = (b"application/json",),
    query: bool = False,
) -> None:
    """Answer POST `path` with `handler` in this worker from now on: bodies of `media_types`, and
    with a query string only when the handler reads one (`query`). A `{name}` part of `path` takes
    any one segment, handed to the handler in `Incoming.params`."""
    route = _Route(handler, max_body_bytes, max_in_flight, frozenset(media_types), query, path)
    if _PARAMETER.search(path) is None:
        _routes[path] = route
        return
    parts = _PARAMETER.split(path)  # literal, name, literal, ...
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
    _patterns[path] = (re.compile(f"^{regex}$"), route)


def release(path: str) -> None:
    _routes.pop(path, None)
    _patterns.pop(path, None)


def _route(path: str) -> tuple[_Route | None, dict[str, str]]:
    route = _routes.get(path)
    if route is not None or not _patterns:
        return route, {}
    for pattern, candidate in _patterns.values():
        matched = pattern.match(path)
        if matched is not None:
            return candidate, matched.groupdict()
    return None, {}


class FastRoutes:
    """ASGI middleware in front of everything: the taken routes' requests to their handlers."""

    def __init__(self, app: ASGIApp, in_flight: InFlight = WORKER_IN_FLIGHT) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, params = _route(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else (None, {})
        if route is None or (scope["query_string"] and not route.query):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if (
            declared is None  # chunked or no body: the limits middleware reads it, bounded
            or int(declared) > route.max_body_bytes  # the limits middleware answers 413
            or media_type(headers) not in route.media_types
            or self.in_flight.n >= route.max_in_flight  # the concurrency limit answers 429
        ):
            await self.app(scope, receive, send)
            return
        self.in_flight.n += 1
        try:
            body = await _body(receive)
            if body is None:
                return  # the client went away
            started = time.perf_counter()
            try:
                answer = await route.handler(Incoming(body, headers, scope["query_string"], params, scope))
            except Exception as exc:
                logger.exception("%s failed", scope["path"])
                answer = Answer.refusing(exc)  # a 500: the log says why
        finally:
            self.in_flight.n -= 1
        if answer is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        metrics.fast_path_seconds.labels(route=route.path, status=str(answer.status)).observe(
            time.perf_counter() - started
        )
        length = (b"content-length", str(len(answer.body)).encode())
        await send({"type": "http.response.start", "status": answer.status, "headers": [*answer.headers, length]})
        await send({"type": "http.response.body", "body": answer.body})


def media_type(headers: Mapping[bytes, bytes]) -> bytes:
    """The body's declared media type, lower-case, without parameters (b"" when none is declared)."""
    return headers.get(b"content-type", b"").partition(b";")[0].strip().lower()


async def _body(receive: Receive) -> bytes | None:
    """The whole body (its length is declared and bounded), or None if the client disconnected."""
    message: Message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # the common case: one message, no copy
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


def install() -> None:
    """Put `FastRoutes` in front of the application of the uvicorn server this process starts
    (BentoML's worker builds its `uvicorn.Config` after importing the service)."""
    from uvicorn.config import Config

    if getattr(Config.load, "_fast_routes", False):
        return
    original = Config.load

    def load(self: Config) -> None:
        original(self)
        self.loaded_app = FastRoutes(self.loaded_app)

    load._fast_routes = True  # type: ignore[attr-defined]
    Config.load = load  # type: ignore[method-assign]
