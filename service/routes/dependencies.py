"""What the review and admin routes depend on: the moderation context the service sets up, one
database connection with the store's errors mapped to statuses, the caller (a bearer token; the
admin role where needed, checked before the body is read by `GuardedRoute`), and the field types
of their bodies."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool, PoolTimeout
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from feedback import review as rs
from service.contract import ContractRoute
from service.problems import problem_response

# Text Postgres can hold (no NUL character); a reason says something (not only spaces).
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00]*$")]
UserName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"),
    Field(
        description="1 to 64 letters, digits, '.', '_' or '-', starting and ending with a letter or digit; "
        "stored in lower case."
    ),
]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")]


@dataclass
class ModerationContext:
    pool: ConnectionPool
    lease_seconds: float = 300.0
    max_leases: int = 200  # live leases one reviewer may hold
    overlap: int = 2
    overlap_share: float = 0.0
    # The served model's class names and a check of one sample's input, when a model is loaded.
    labels: Callable[[], Sequence[str] | None] = lambda: None
    # The class names of any served model, by name (None: not served here, so not checked).
    labels_of: Callable[[str], Sequence[str] | None] | None = None
    # (model name, numbers or image bytes) -> the input as stored (.npy or image bytes, media type);
    # ValueError saying why a sample does not fit the model, LookupError for a model not served.
    to_input: Callable[[str, Any], tuple[bytes, str | None]] | None = None
    model_name: str = "reviewer"  # the model samples are added for by default (the service's default)


_bearer = HTTPBearer(auto_error=False)


def _context(request: Request) -> ModerationContext:
    context: ModerationContext | None = getattr(request.app.state, "moderation", None)
    if context is None:
        raise HTTPException(503, "moderation needs a database (LOOP_DATABASE_URL)")
    return context


@contextlib.contextmanager
def db_connection(context: ModerationContext) -> Iterator[psycopg.Connection]:
    try:
        with context.pool.connection(timeout=5) as conn:
            yield conn
    except rs.Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    except rs.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except rs.Invalid as exc:
        raise HTTPException(422, str(exc)) from None
    except psycopg.DataError as exc:  # a value Postgres cannot hold, e.g. text with a NUL byte
        raise HTTPException(422, f"invalid value: {exc}") from None
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise HTTPException(503, f"database unavailable: {exc}") from None


Context = Annotated[ModerationContext, Depends(_context)]


def _authenticate(context: ModerationContext, credentials: HTTPAuthorizationCredentials | None) -> rs.User:
    if credentials is None or credentials.scheme.lower() != "bearer" or len(credentials.credentials) > 512:
        raise HTTPException(401, "send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    with db_connection(context) as conn:
        user = rs.authenticate(conn=conn, token=credentials.credentials)
    if user is None:
        raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    return user


def _user(
    request: Request,
    context: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> rs.User:
    known: rs.User | None = getattr(request.state, "user", None)  # checked by `GuardedRoute`
    return known if known is not None else _authenticate(context, credentials)


def _admin(user: Annotated[rs.User, Depends(_user)]) -> rs.User:
    if user.role is not rs.Role.ADMIN:
        raise HTTPException(403, "this needs the admin role")
    return user


Reviewer = Annotated[rs.User, Depends(_user)]
Admin = Annotated[rs.User, Depends(_admin)]


class GuardedRoute(ContractRoute):
    """A route that checks its caller before FastAPI reads the body (and, as every route of the
    service, answers a body that fails validation with 422 without echoing it).

    FastAPI parses a JSON body before it resolves dependencies, so a stranger's junk would get a
    422 (after the whole body was parsed) instead of a 401, and a reviewer's junk sent to an admin
    route a 422 instead of a 403. The role a route needs is read off its own dependencies. FastAPI's
    own 422 echoes the input, which fails to render when it holds a NaN (a 500) and may be huge.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs = _role_needed(self.dependant)

        async def guarded(request: Request) -> Response:
            try:
                if needs is not None:
                    credentials = await _bearer(request)
                    user = await run_in_threadpool(_authenticate, _context(request), credentials)
                    if needs is rs.Role.ADMIN:
                        _admin(user)
                    request.state.user = user
            except HTTPException as exc:
                return problem_response(exc.status_code, str(exc.detail), headers=exc.headers)
            return await handler(request)

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
