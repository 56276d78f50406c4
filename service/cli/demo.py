"""`loop demo-loop` and `loop demo-data`: thin commands over the measured loop demo and the
synthetic data sets of the built-in models."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from experiments.demo_loop import demo_loop
from experiments.demo_shadow import demo_shadow
from service.cli.common import progress

__all__ = ["demo_data", "demo_loop", "demo_shadow"]


def _demo_data_names() -> list[str]:
    from models.builtin import DEMO_DATA

    return list(DEMO_DATA)


@click.command("demo-data")
@click.argument("name", type=click.Choice(sorted(_demo_data_names())))
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=click.IntRange(min=1), help="Images per class (default: the data set's).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(name: str, folder: Path, per_class: int | None, seed: int) -> None:
    """Write a synthetic data set for a built-in model (e.g. `shapes`), made the same way everywhere."""
    import time

    from models.builtin import DEMO_DATA

    data = DEMO_DATA[name]
    if folder.exists() and any(folder.iterdir()):
        raise click.ClickException(f"{folder} is not empty; write the data set into a new folder")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        count = data.write(
            folder, per_class=per_class or data.default_per_class, seed=seed, progress=progress(stack, "drawing")
        )
    click.echo(
        f"wrote {count} images to {folder} in {time.perf_counter() - started:.1f} s: {data.description}\n"
        f"next: loop datasets import {data.model_name} {folder}"
    )
