"""`loop shadow start|stop|status`: a stored version of a model sees a share of its live requests,
after their clients were answered, so that reviewers judge it before it answers anyone."""

from __future__ import annotations

from typing import Any

import click

from service.cli.common import admin, announcing, clean_errors, connection, redis_url
from service.settings import Settings


def _announcer(settings: Settings) -> Any:
    from feedback.keys import Keys
    from feedback.use_cases import shadow_announcer

    return announcing(shadow_announcer(redis_url(settings), Keys(settings.redis_prefix)), "the shadow")


def _described(shadow: Any) -> str:
    by = f" by {shadow.started_by}" if shadow.started_by else ""
    started = f"started {shadow.started_at:%Y-%m-%d %H:%M:%S}{by}"
    line = f"{shadow.model_name}:{shadow.model_version}  share {shadow.share:g}  {started}"
    if shadow.stopped_at is not None:
        line += f"  stopped {shadow.stopped_at:%Y-%m-%d %H:%M:%S}: {shadow.stop_reason}"
    return line


@click.group()
def shadow() -> None:
    """Shadows: a candidate judged on live traffic before it answers anyone."""


@shadow.command("start")
@click.argument("tag", metavar="NAME:VERSION")
@click.option(
    "--share",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="The share of the model's prediction requests the shadow sees.",
)
@click.option("--admin", "admin_name", required=True, help="The admin starting it.")
def start(tag: str, share: float, admin_name: str) -> None:
    """Start a shadow of NAME at VERSION (a stored version); one a model at a time."""
    from feedback.use_cases import start_shadow

    name, _, version = tag.partition(":")
    if not name or not version:
        raise click.BadParameter(f"{tag!r} is not NAME:VERSION", param_hint="NAME:VERSION")
    settings = Settings()
    with connection(settings) as conn, clean_errors():
        actor = admin(conn, admin_name, required=True)
        started = start_shadow(
            conn=conn,
            model_name=name,
            model_version=version,
            share=share,
            actor=actor,
            announcer=_announcer(settings),
        )
    click.echo(f"shadowing: {_described(started)}")


@shadow.command("stop")
@click.argument("name")
@click.option("--reason", required=True, help="Why it stops.")
@click.option("--admin", "admin_name", required=True, help="The admin stopping it.")
def stop(name: str, reason: str, admin_name: str) -> None:
    """Stop the shadow of model NAME."""
    from feedback.use_cases import stop_shadow

    settings = Settings()
    with connection(settings) as conn, clean_errors():
        actor = admin(conn, admin_name, required=True)
        stopped = stop_shadow(conn=conn, model_name=name, reason=reason, actor=actor, announcer=_announcer(settings))
    click.echo(f"stopped: {_described(stopped)}")


@shadow.command("decide")
@click.argument("name")
@click.option("--admin", "admin_name", required=True, help="The admin deciding.")
def decide(name: str, admin_name: str) -> None:
    """Promote the shadow of model NAME or reject it, on the frozen-set gate and its judged live
    items (LOOP_SHADOW_POLICY, LOOP_SHADOW_ALPHA, LOOP_SHADOW_MIN_JUDGED); the shadow stops."""
    from feedback.use_cases import decide_shadow
    from service.cli.retrain import _announcer as champion_announcer

    settings = Settings()
    with connection(settings) as conn, clean_errors():
        actor = admin(conn, admin_name, required=True)
        decided = decide_shadow(
            conn=conn,
            model_name=name,
            rules=settings.shadow_rules,
            actor=actor,
            announcer=champion_announcer(settings),
            shadow_announcer=_announcer(settings),
        )
    found, promotion = decided.evidence, decided.promotion
    click.echo(
        f"{found.shadowed} items shadowed, {found.judged} judged: answers right on {found.champion.correct}, "
        f"the shadow on {found.shadow.correct} (McNemar p = {found.p_value:.4f})"
    )
    click.echo(f"{promotion.model_name}:{promotion.model_version} {promotion.decision.value}: {promotion.reason}")


@shadow.command("status")
@click.argument("name", required=False)
def status(name: str | None) -> None:
    """Every shadow of model NAME (default: LOOP_MODEL_NAME), oldest first; the live one is marked."""
    from feedback import shadow as shadows

    settings = Settings()
    model_name = name or settings.model_name
    with connection(settings) as conn:
        found = shadows.history(conn=conn, model_name=model_name)
    if not found:
        click.echo(f"{model_name} has had no shadow")
    for s in found:
        click.echo(("* " if s.live else "  ") + _described(s))
