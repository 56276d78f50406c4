"""Bounds on what a request may make the service read, enforced before anything is parsed.

`RequestLimits` is ASGI middleware in front of every route (BentoML's and the mounted ones): a
body declared over its route's limit is answered 413 before a byte of it is read; a chunked body
is read up to the limit and no further. A multipart body sent to `POST /predict` is handed to the
upload route (image models' files); other form bodies there get 415 (BentoML would parse them).

`ConcurrencyLimit` is ASGI middleware too: a worker takes at most `LOOP_MAX_CONCURRENCY` requests
at once and answers the next 429 at once, so every queue in memory (the batcher's, the log's) is
bounded by it; the health probes always pass.

`BoundedHttpToolsProtocol` (uvicorn's httptools protocol, the C parser; the default) and
`BoundedHeadProtocol` (its h11 protocol, pure Python) have one bound for the request line and
headers, whether they arrive in one piece or many: over it, the answer is 431. Both linger on close while
the client may still be sending (a refused head, or a body not read: a 413, a 429, with
`Connection: close`): the writing side is shut after the answer, and the rest of what the client
sends is read and dropped for a moment before the connection closes, so that every client reads
the answer rather than a connection reset.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    _HAS_HTTPTOOLS = True
except ImportError:  # httptools is not installed: h11 only
    HttpToolsProtocol = H11Protocol  # type: ignore[misc,assignment]
    _HAS_HTTPTOOLS = False

from feedback.errors import Busy, DomainError, TooLarge, Unsupported
from service.problems import HeadTooLarge, answer, encoded

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_HEAD_BYTES = 32 * 1024  # request line and headers together
DRAIN_BYTES = 64 * 2**20  # closing while the client still sends: read and drop at most this much
DRAIN_SECONDS = 5.0  # ... for at most this long, then close
JSON_ROUTES = ("/predict",)  # BentoML's JSON APIs: a form body there is a mistake...
UPLOAD_ROUTE = "/predict/files"  # ... except uploaded images, which this route takes
FORM_TYPES = ("multipart/", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class BodyLimits:
    """Most bytes a request body may have: prediction routes carry samples, the rest small JSON."""

    predict: int
    other: int

    def for_path(self, path: str) -> int:
        predicts = path == "/predict" or path.startswith("/predict/")
        infers = path.startswith("/v2/models/") and path.endswith("/infer")  # the Open Inference Protocol's
        tasks = path.startswith("/label-studio/") and path.endswith("/predict")  # Label Studio's tasks
        return self.predict if predicts or infers or tasks else self.other


async def _refuse(exc: DomainError, scope: Scope, receive: Receive, send: Send) -> None:
    # The connection stays open: uvicorn reads and drops the rest of the body, so the client
    # (still sending) reads the answer instead of a reset.
    await answer(exc, v2=scope["path"].startswith("/v2/"))(scope, receive, send)


PROBES = frozenset({"/readyz", "/livez", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready"})


class InFlight:
    """How many requests this worker has in hand, whichever way they are answered."""

    def __init__(self) -> None:
        self.n = 0


WORKER_IN_FLIGHT = InFlight()


class ConcurrencyLimit:
    """ASGI middleware: at most `limit` requests at once in this worker; beyond, 429."""

    def __init__(self, app: ASGIApp, limit: int | Callable[[], int], in_flight: InFlight = WORKER_IN_FLIGHT) -> None:
        self.app = app
        self._limit = limit
        self.in_flight = in_flight

    @property
    def limit(self) -> int:
        if callable(self._limit):  # read once, on the first request (settings live in the worker)
            self._limit = self._limit()
        return self._limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.in_flight.n >= self.limit:
            message = f"this worker has {self.in_flight.n} requests in hand, its most; try again in a moment"
            await _refuse(Busy(message), scope, receive, send)
            return
        self.in_flight.n += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.n -= 1


class RequestLimits:
    """ASGI middleware: 413 for bodies over their route's limit; multipart `/predict` goes to the upload
    route, other forms get 415."""

    def __init__(self, app: ASGIApp, limits: BodyLimits | Callable[[], BodyLimits]) -> None:
        self.app = app
        self._limits = limits

    @property
    def limits(self) -> BodyLimits:
        if callable(self._limits):  # read once, on the first request (settings live in the worker)
            self._limits = self._limits()
        return self._limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1").strip().lower()
        if path in JSON_ROUTES and content_type.startswith("multipart/form-data"):
            scope = {**scope, "path": UPLOAD_ROUTE, "raw_path": UPLOAD_ROUTE.encode()}  # image uploads
        elif path in JSON_ROUTES and content_type.startswith(FORM_TYPES):
            media_type = content_type.split(";")[0]
            message = f"{path} takes a JSON body (application/json) or uploaded images, not {media_type}"
            await _refuse(Unsupported(message), scope, receive, send)
            return
        limit = self.limits.for_path(path)
        declared = headers.get(b"content-length")
        if declared is not None:
            # The HTTP parser has already checked that it is a number and that the body matches it.
            size = int(declared)
            if size > limit:
                message = f"the body of {size} bytes is over the limit of {limit} bytes for {path}"
                await _refuse(TooLarge(message), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        body = await _read_at_most(receive, limit)
        if body is None:
            await _refuse(TooLarge(f"the body is over the limit of {limit} bytes for {path}"), scope, receive, send)
            return
        await self.app(scope, replay_body(body, receive), send)


async def _read_at_most(receive: Receive, limit: int) -> bytes | None:
    """A chunked body, or None once it passes `limit` bytes (or the client goes away)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over `body` (already read) first, then whatever the client sends."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # only a disconnect comes after the body
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _BoundedConnection(h11.Connection):
    """An h11 server connection that refuses request heads over `MAX_HEAD_BYTES`, however they arrive.

    h11 itself bounds only a head still incomplete after a read; one that arrives whole is checked here.
    """

    def __init__(self) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if size > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


def _head_refusal() -> bytes:
    """The whole 431 answer, as bytes: the connection is closed after it."""
    status, headers, body = encoded(
        HeadTooLarge(f"the request line and headers are over the limit of {MAX_HEAD_BYTES} bytes")
    )
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    lines += [f"content-length: {len(body)}".encode(), b"connection: close", b"", b""]
    return b"\r\n".join(lines) + body


class _LingeringTransport:
    """The connection's transport, whose `close` lingers while the client may still be sending the
    request (its body, or a head that was refused): the answer is flushed and the writing side shut
    (FIN), then what the client still sends is read and dropped, up to `DRAIN_BYTES` for at most
    `DRAIN_SECONDS`, and only then is the socket closed. Closing with unread data in the socket
    makes the kernel reset the connection, and the reset can overtake the answer: a client that
    sent a body too large with `Connection: close` would read a reset, not the 413."""

    def __init__(self, transport: asyncio.Transport, sending: Callable[[], bool]) -> None:
        self._transport = transport
        self._sending = sending  # whether the client may still be sending the request
        self._drain_left: int | None = None  # set once lingering

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    @property
    def lingering(self) -> bool:
        return self._drain_left is not None

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering:
            return
        if self._transport.is_closing() or not self._sending():
            self._transport.close()
            return
        self._drain_left = DRAIN_BYTES
        if self._transport.can_write_eof():
            self._transport.write_eof()  # after what was written: the client reads all of the answer
        self._transport.resume_reading()  # flow control may have paused it: the rest is dropped now
        asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._transport.close)

    def dropped(self, data: bytes) -> bool:
        """True when `data` arrived while lingering, and was dropped."""
        if self._drain_left is None:
            return False
        self._drain_left -= len(data)
        if self._drain_left <= 0:
            self._transport.close()
        return True


class _Lingers:
    """What both bounded protocols share: a transport that lingers on close while the client is
    still sending, and the 431 to a head over the limit (answered, then closed that way)."""

    transport: Any
    client: Any
    _head_refused = False

    def _wrap(self, transport: asyncio.Transport) -> None:
        self.transport = _LingeringTransport(transport, self._sending)

    def _sending(self) -> bool:
        raise NotImplementedError

    def _refuse_head(self) -> None:
        logger.info("refused a request head over %d bytes from %s", MAX_HEAD_BYTES, self.client)
        self._head_refused = True
        self.transport.write(_head_refusal())
        self.transport.close()

    def _drained(self, data: bytes) -> bool:
        """True when `data` was dropped: the connection is closing."""
        return isinstance(self.transport, _LingeringTransport) and self.transport.dropped(data)


class BoundedHeadProtocol(_Lingers, H11Protocol):
    """uvicorn's h11 protocol answering 431 to request heads over `MAX_HEAD_BYTES`, and lingering
    on close while the client is still sending."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _BoundedConnection()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wrap(transport)

    def _sending(self) -> bool:
        return self._head_refused or self.conn.their_state is h11.SEND_BODY

    def data_received(self, data: bytes) -> None:
        if not self._drained(data):
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from inside its `except h11.RemoteProtocolError`: the error is at hand.
        error = sys.exc_info()[1]
        if getattr(error, "error_status_hint", 400) != 431:
            super().send_400_response(msg)
            return
        self._refuse_head()


class _HeadTooLarge(Exception):
    pass


class BoundedHttpToolsProtocol(_Lingers, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C: the faster parser) with the same bound.

    The parser hands over the URL in pieces and each header whole, and keeps an unfinished header
    to itself: the bytes of a head still unfinished after a read are counted too, so a head that
    never ends is refused once it is over the limit, whatever it is made of."""

    _in_head = False
    _head_size = 0  # the URL's and headers' bytes seen by the callbacks
    _head_read = 0  # bytes read while the head was unfinished

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wrap(transport)

    def _sending(self) -> bool:
        return self._head_refused or self._in_head or (self.cycle is not None and self.cycle.more_body)

    def data_received(self, data: bytes) -> None:
        if self._drained(data):
            return
        was_in_head = self._in_head
        super().data_received(data)
        if not self._head_refused and self._in_head:
            self._head_read += len(data) if was_in_head else 0
            if self._head_read > MAX_HEAD_BYTES:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_size, self._head_read = True, 0, 0

    def _grow(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_HEAD_BYTES:
            raise _HeadTooLarge  # the parser stops; uvicorn answers through send_400_response

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._head_size > MAX_HEAD_BYTES:
            self._refuse_head()
        else:
            super().send_400_response(msg)


def use_bounded_heads(parser: str = "httptools") -> None:
    """Make uvicorn's default ("auto") HTTP protocol a bounded one, for servers configured after
    this: on `httptools` (when installed) or `h11`."""
    from uvicorn import config

    chosen = BoundedHttpToolsProtocol if parser == "httptools" and _HAS_HTTPTOOLS else BoundedHeadProtocol
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{chosen.__name__}"
