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
    def refusing(cls, exc: Exception) -> Answer:
        """An error as problem details, as the app's handlers answer it."""
        status, headers, body = problems.encoded(exc)
        return cls(status, body, headers)


# The request's body, headers (lower-case names) and query string -> its answer, or None: not here,
# answer it as always.
Handler = Callable[[bytes, Mapping[bytes, bytes], bytes], Awaitable[Answer | None]]


@dataclass(frozen=True)
class _Route:
    handler: Handler
    max_body_bytes: int
    max_in_flight: int
    media_types: frozenset[bytes]  # the bodies it takes, by media type (b"": none declared)
    query: bool  # whether the handler reads a query string (else a request with one is handed over)


_routes: dict[str, _Route] = {}


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
    with a query string only when the handler reads one (`query`)."""
    _routes[path] = _Route(handler, max_body_bytes, max_in_flight, frozenset(media_types), query)


def release(path: str) -> None:
    _routes.pop(path, None)


class FastRoutes:
    """ASGI middleware in front of everything: the taken routes' requests to their handlers."""

    def __init__(self, app: ASGIApp, in_flight: InFlight = WORKER_IN_FLIGHT) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or (scope["query_string"] and not route.query):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if (
            declared is None  # chunked or no body: the limits middleware reads it, bounded
            or int(declared) > route.max_body_bytes  # the limits middleware answers 413
            or _media_type(headers) not in route.media_types
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
                answer = await route.handler(body, headers, scope["query_string"])
            except Exception as exc:
                logger.exception("%s failed", scope["path"])
                answer = Answer.refusing(exc)  # a 500: the log says why
        finally:
            self.in_flight.n -= 1
        if answer is None:
            await self.app(scope, replay_body(body, receive), send)
            return
        metrics.fast_path_seconds.labels(route=scope["path"], status=str(answer.status)).observe(
            time.perf_counter() - started
        )
        length = (b"content-length", str(len(answer.body)).encode())
        await send({"type": "http.response.start", "status": answer.status, "headers": [*answer.headers, length]})
        await send({"type": "http.response.body", "body": answer.body})


def _media_type(headers: Mapping[bytes, bytes]) -> bytes:
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
