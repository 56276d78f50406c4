"""`loop users`: reviewers and admins, and their API tokens."""

from __future__ import annotations

import click

from service.cli.common import connection
from service.settings import Settings


@click.group()
def users() -> None:
    """Reviewers and admins (LOOP_DATABASE_URL, else the running embedded database)."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["reviewer", "admin"]), default="reviewer", show_default=True)
def users_add(name: str, role: str) -> None:
    """Create a user and print its API token (shown this once)."""
    from feedback import review as review_store

    with connection(Settings()) as conn:
        try:
            user, token = review_store.create_user(conn=conn, name=name, role=review_store.Role(role))
        except (review_store.Conflict, review_store.Invalid) as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"created {user.role.value} {user.name!r}; token (shown once):", err=True)
    click.echo(token)


@users.command("list")
def users_list() -> None:
    """List users."""
    from feedback import review as review_store

    with connection(Settings()) as conn:
        for user in review_store.list_users(conn=conn):
            click.echo(f"{user.id}\t{user.name}\t{user.role.value}")
