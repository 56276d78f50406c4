"""`loop dead-letters`: the predictions the ingest worker could not store, listed and replayed."""

from __future__ import annotations

import click

from service.cli.common import redis_url
from service.settings import Settings


@click.group("dead-letters")
def dead_letters_group() -> None:
    """Predictions the ingest worker could not store: inspect them, replay them once fixed."""


@dead_letters_group.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="Most entries shown.")
def dead_letters_list(limit: int) -> None:
    """The oldest dead letters: entry id, prediction id and why they were refused."""
    import redis

    from feedback.keys import Keys
    from feedback.predictions import dead_letters

    settings = Settings()
    keys = Keys(settings.redis_prefix)
    with redis.Redis.from_url(redis_url(settings), socket_connect_timeout=2) as client:
        total = dead_letters.count(client, keys)
        shown = dead_letters.read(client, keys, limit=limit)
    for letter in shown:
        reason = " ".join(letter.reason.split())  # one line per entry
        click.echo(f"{letter.entry_id}\t{letter.prediction_id}\t{reason}")
    click.echo(
        f"{total} dead letters in {keys.dead_letters}" + (f" ({len(shown)} shown)" if total > len(shown) else ""),
        err=True,
    )


@dead_letters_group.command("replay")
@click.argument("entry_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Replay every dead letter.")
def dead_letters_replay(entry_ids: tuple[str, ...], everything: bool) -> None:
    """Move dead letters back onto the prediction stream (after fixing why they were refused)."""
    import redis

    from feedback.keys import Keys
    from feedback.predictions import dead_letters

    if bool(entry_ids) == everything:
        raise click.UsageError("name the entries to replay, or pass --all")
    settings = Settings()
    keys = Keys(settings.redis_prefix)
    with redis.Redis.from_url(redis_url(settings), socket_connect_timeout=2) as client:
        try:
            moved = dead_letters.replay(client, keys, entry_ids=None if everything else entry_ids)
        except KeyError as exc:
            raise click.ClickException(str(exc.args[0])) from None
        except redis.ResponseError as exc:  # not a stream id at all
            raise click.ClickException(str(exc)) from None
    click.echo(f"replayed {moved} entries onto {keys.stream}; the ingest worker stores each once")
