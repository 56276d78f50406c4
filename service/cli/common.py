"""What the command groups share: where the servers are, one database connection, errors a user
can fix shown as one line, the `--model` option, an admin named on the command line, a progress bar.

Every data-loop command works on LOOP_DATABASE_URL (else the embedded database `loop serve` runs)
and announces promotions on LOOP_REDIS_URL (else the embedded Redis). Each takes `--model NAME`
(default LOOP_MODEL_NAME): the model's spec says its classes, its inputs and its trainer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from service.settings import Settings

if TYPE_CHECKING:
    import psycopg

    from feedback.review import User


def database_url(settings: Settings) -> str:
    """The configured database, else the embedded one `loop serve` runs (it must be running)."""
    return settings.database_url or f"postgresql://postgres@127.0.0.1:{settings.embedded_postgres_port}/loop"


def redis_url(settings: Settings) -> str:
    return settings.redis_url or f"redis://127.0.0.1:{settings.embedded_redis_port}/0"


@contextlib.contextmanager
def connection(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection to the loop's database, its schema brought up to date first."""
    import psycopg

    from feedback.migrate import migrate
    from feedback.predictions import blobs
    from service import database

    try:
        conn = database.connect(database_url(settings))
    except psycopg.OperationalError as exc:
        raise click.ClickException(
            f"cannot reach Postgres ({exc}); set LOOP_DATABASE_URL or run `loop serve` for the embedded one"
        ) from None
    with conn:
        migrate(conn)
        blobs.attach(conn, settings.blob_store())
        yield conn


@contextlib.contextmanager
def clean_errors() -> Iterator[None]:
    """Errors a user can fix are one line on stderr and exit status 1, not a traceback."""
    from feedback.errors import DomainError
    from models.store import ModelNotFound

    try:
        yield
    except (DomainError, ModelNotFound, LookupError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


def model_option(function: Any) -> Any:
    """`--model NAME`, default LOOP_MODEL_NAME."""
    return click.option("--model", "model_name", help="Model name (default: LOOP_MODEL_NAME).")(function)


def progress(stack: contextlib.ExitStack, label: str) -> Any:
    """A progress callback (done, expected) that draws a bar on stderr once it is first called."""
    bar: list[Any] = []

    def on_progress(done: int, expected: int) -> None:
        if not bar:
            bar.append(stack.enter_context(click.progressbar(length=expected, label=label, file=sys.stderr)))
        bar[0].update(done - bar[0].pos)

    return on_progress


def admin(conn: psycopg.Connection, name: str | None, *, required: bool) -> User | None:
    """The admin named by `--admin NAME` (None when not named and not required)."""
    from feedback import review as review_store

    if name is None:
        if required:
            raise click.ClickException("this is an admin action: name the admin with --admin NAME")
        return None
    user = review_store.get_user(conn=conn, name=name)
    if user is None or user.role is not review_store.Role.ADMIN:
        raise click.ClickException(f"{name!r} is not an admin (see `loop users list`)")
    return user


def announcing(announce: Callable[..., None], what: str) -> Callable[..., None]:
    """`announce`, with a warning rather than a failure when Redis cannot be reached: what was
    recorded in Postgres stands, and the workers read it on their next check."""
    import redis

    def announcer(*args: Any) -> None:
        try:
            announce(*args)
        except redis.RedisError as exc:
            click.echo(f"warning: {what} recorded but not announced ({exc}); workers pick it up on start", err=True)

    return announcer
