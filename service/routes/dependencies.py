"""What the review and admin routes depend on: the moderation context the service sets up, the
caller (a bearer token; the admin role where needed, checked before the body is read by
`GuardedRoute`), one database connection per request, shared by that check and the handler, and
the base of their bodies."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from feedback import review as rs
from feedback.errors import Forbidden, Unauthenticated, Unavailable
from service.contract import ContractRoute


@dataclass
class ModerationContext:
    pool: ConnectionPool
    lease_seconds: float = 300.0
    max_leases: int = 200  # live leases one reviewer may hold
    overlap: int = 2
    overlap_share: float = 0.0
    mixed_share: float = 0.2  # shadowed items offered among the disagreements (the `disagree` order)
    gold_share: float = 0.0  # the chance of each place of a claim to hold a gold item
    # The served model's class names and a check of one sample's input, when a model is loaded.
    labels: Callable[[], Sequence[str] | None] = lambda: None
    # The class names of any served model, by name (None: not served here, so not checked).
    labels_of: Callable[[str], Sequence[str] | None] | None = None
    # (model name, numbers or image bytes) -> the input as stored (.npy or image bytes, media type);
    # ValueError saying why a sample does not fit the model, LookupError for a model not served.
    to_input: Callable[[str, Any], tuple[bytes, str | None]] | None = None
    model_name: str = "reviewer"  # the model samples are added for by default (the service's default)


POOL_WAIT_S = 5.0  # how long a request waits for a pooled connection before a 503

_bearer = HTTPBearer(auto_error=False)


def _context(request: Request) -> ModerationContext:
    context: ModerationContext | None = getattr(request.app.state, "moderation", None)
    if context is None:
        raise Unavailable("moderation needs a database (LOOP_DATABASE_URL)")
    return context


Context = Annotated[ModerationContext, Depends(_context)]


def _connection(request: Request, context: Context) -> Iterator[psycopg.Connection]:
    """The request's database connection: the one `GuardedRoute` checked the caller with, or one
    of its own for a route that needs no caller. The store's and the database's errors raised
    through it are answered by `service.problems`."""
    held: psycopg.Connection | None = getattr(request.state, "connection", None)
    if held is not None:
        yield held
        return
    with context.pool.connection(timeout=POOL_WAIT_S) as conn:
        yield conn


Connection = Annotated[psycopg.Connection, Depends(_connection)]


def _user(request: Request) -> rs.User:
    user: rs.User = request.state.user  # checked by `GuardedRoute` before the body is read
    return user


def _admin(user: Annotated[rs.User, Depends(_user)]) -> rs.User:
    return user  # `GuardedRoute` checked the role: this marks the routes that need it


Reviewer = Annotated[rs.User, Depends(_user)]
Admin = Annotated[rs.User, Depends(_admin)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer" or len(credentials.credentials) > 512:
        raise Unauthenticated("send Authorization: Bearer <token>")
    return credentials.credentials


def _caller(conn: psycopg.Connection, token: str, needs: rs.Role) -> rs.User:
    user = rs.authenticate(conn=conn, token=token)
    if user is None:
        raise Unauthenticated("unknown token")
    if needs is rs.Role.ADMIN and user.role is not rs.Role.ADMIN:
        raise Forbidden("this needs the admin role")
    return user


class GuardedRoute(ContractRoute):
    """A route that checks its caller before FastAPI reads the body, on the one database
    connection the whole request then uses (and, as every route of the service, answers a body
    that fails validation with 422 without echoing it).

    FastAPI parses a JSON body before it resolves dependencies, so a stranger's junk would get a
    422 (after the whole body was parsed) instead of a 401, and a reviewer's junk sent to an admin
    route a 422 instead of a 403. The role a route needs is read off its own dependencies. FastAPI's
    own 422 echoes the input, which fails to render when it holds a NaN (a 500) and may be huge.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs = _role_needed(self.dependant)
        if needs is None:
            return handler

        async def guarded(request: Request) -> Response:
            token = _token(await _bearer(request))  # no database needed to refuse a request without one
            pool = _context(request).pool
            conn = await run_in_threadpool(pool.getconn, POOL_WAIT_S)
            try:
                request.state.user = await run_in_threadpool(_caller, conn, token, needs)
                request.state.connection = conn
                return await handler(request)
            finally:
                request.state.connection = None
                await run_in_threadpool(pool.putconn, conn)

        return guarded


def _role_needed(dependant: Dependant) -> rs.Role | None:
    calls = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        calls.add(current.call)
        pending.extend(current.dependencies)
    if _admin in calls:
        return rs.Role.ADMIN
    return rs.Role.REVIEWER if _user in calls else None


class RequestBody(BaseModel):
    """A JSON request body: NaN and infinity are refused like any other invalid number, and so is
    a member the body does not have (a misspelt one would otherwise be ignored in silence)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")
