"""The `loop` command line, one module per command group:

- `models`: train, show, models import|list
- `serve`: serve (the supervisor is `service/supervisor.py`), ingest, inference, engine, migrate
- `maintain`: the prediction log's partitions and retention
- `health`: a model's live health (drift, estimated and judged accuracy)
- `users`, `dead_letters`: users add|list, dead-letters list|replay
- `datasets`: datasets import|compile|list|show|verify, validation show|fix
- `retrain`: retrain, promote, champion, experiments
- `shadow`: shadow start|stop|status
- `review`: review export|import (Label Studio's JSON)
- `demo`: demo-loop, demo-shadow, demo-data

`common` holds what they share. Commands import their heavy dependencies when they run, so that
`loop --help` starts quickly.
"""

from __future__ import annotations

import logging
import os

import click

from service.cli import datasets, dead_letters, demo, health, maintain, models, retrain, review, serve, shadow, users


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Loop: serve models, store every prediction, learn from reviewers."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    _configure_logging(verbose)


for _command in (
    models.train,
    models.show,
    models.models,
    users.users,
    serve.migrate,
    maintain.maintain,
    health.health,
    dead_letters.dead_letters_group,
    serve.ingest,
    serve.inference,
    serve.engine,
    serve.serve,
    datasets.datasets,
    datasets.validation,
    retrain.retrain,
    retrain.promote,
    retrain.champion,
    retrain.experiments,
    shadow.shadow,
    review.review,
    demo.demo_loop,
    demo.demo_shadow,
    demo.demo_data,
):
    main.add_command(_command)
