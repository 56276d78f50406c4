"""Likely label errors in a training version or a model's original data, found and offered to reviewers.

Every row of the version is scored out of sample (the model's own trainer, on the other folds;
`models.label_errors`), and confident learning ranks the rows whose label is probably wrong. The
ranking replaces the model's previous one in `label_suspects`. Rows that are logged predictions
are offered to reviewers by the `suspect` review order, most likely first, each to one reviewer
who never judged it, until someone judges it after the version: their verdict is recorded as any
other (a second opinion that differs leaves the item disputed, for an admin or for weighting), so
the next compiled version has it. Rows of the original data are listed with the label suggested.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from feedback.datasets.store import DatasetVersion, Kind
from feedback.datasets.versions import read_version, verify
from feedback.errors import Invalid
from feedback.predictions import store as log_store
from feedback.predictions.records import created_at
from feedback.retrain import trainer_for, validation_for
from feedback.review.audit import audit
from feedback.review.users import User
from models import builtin
from models.label_errors import FOLDS, out_of_sample, rank
from models.spec import ModelSpec
from models.train import TrainConfig
from models.trainers import Examples

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuspectRow:
    rank: int  # 1: the most likely error
    item_id: str
    prediction_id: uuid.UUID | None  # set where the row is a logged prediction, which reviewers can judge
    label: str  # as given in the version
    suggested: str  # the most probable class out of sample
    quality: float  # the out-of-sample probability of the label given


@dataclass(frozen=True)
class Ranking:
    model_name: str
    dataset_id: str
    rows: int
    folds: int
    suspects: list[SuspectRow]

    @property
    def reviewable(self) -> int:
        return sum(s.prediction_id is not None for s in self.suspects)


def find(
    *,
    conn: psycopg.Connection,
    model_name: str,
    dataset: DatasetVersion,
    config: TrainConfig | None = None,
    folds: int = FOLDS,
    spec: ModelSpec | None = None,
    actor: User | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> Ranking:
    """Rank the rows of `dataset` (a training or original version of `model_name`) whose label is
    probably wrong, and keep the ranking as the model's current one; `Invalid` for a version or a
    model that cannot be ranked, before any training."""
    kinds = (Kind.TRAINING, Kind.ORIGINAL)
    validation = validation_for(conn, model_name, dataset, kinds=kinds, taker="a ranking of label errors")
    spec, trainer, base = trainer_for(model_name, spec or builtin.spec_of(model_name), None)
    if list(spec.classes) != dataset.manifest["label_schema"]["class_names"]:
        raise Invalid(f"{dataset.id} was compiled for other classes than {model_name}'s spec names")
    verify(dataset.uri, dataset.id)
    rows, held = read_version(dataset.uri), read_version(validation.uri)
    try:
        probabilities = out_of_sample(
            spec,
            trainer,
            Examples(rows.inputs, rows.labels),
            Examples(held.inputs, held.labels),
            config=config or TrainConfig(),
            folds=folds,
            base=None if base is None else base.onnx_path,
            on_fold=on_fold,
        )
    except ValueError as exc:
        raise Invalid(f"{dataset.id} cannot be ranked: {exc}") from None
    classes = spec.classes
    logged = log_store.logged(conn=conn, item_ids=rows.item_ids, model_name=model_name)
    suspects = [
        SuspectRow(
            rank=k + 1,
            item_id=rows.item_ids[s.index],
            prediction_id=logged.get(rows.item_ids[s.index]),
            label=classes[int(rows.labels[s.index])],
            suggested=classes[s.suggested],
            quality=s.quality,
        )
        for k, s in enumerate(rank(rows.labels, probabilities))
    ]
    ranking = Ranking(model_name, dataset.id, len(rows.item_ids), folds, suspects)
    _keep(conn, ranking, watermark=dataset.watermark or 0, actor=actor)
    logger.info(
        "%s: %d of %d rows of %s are likely label errors (%d reviewable)",
        model_name,
        len(suspects),
        ranking.rows,
        dataset.id,
        ranking.reviewable,
    )
    return ranking


def _keep(conn: psycopg.Connection, ranking: Ranking, *, watermark: int, actor: User | None) -> None:
    """Replace the model's ranking with `ranking`."""
    with conn.transaction():
        conn.execute("DELETE FROM label_suspects WHERE model_name = %s", (ranking.model_name,))
        with conn.cursor().copy(
            "COPY label_suspects (model_name, item_id, prediction_id, item_created_at, rank, quality, label,"
            " suggested, dataset_id, watermark) FROM STDIN"
        ) as copy:
            for s in ranking.suspects:
                created = None if s.prediction_id is None else created_at(s.prediction_id)
                row = (s.item_id, s.prediction_id, created, s.rank, s.quality, s.label, s.suggested)
                copy.write_row((ranking.model_name, *row, ranking.dataset_id, watermark))
        details = {"dataset": ranking.dataset_id, "suspects": len(ranking.suspects), "reviewable": ranking.reviewable}
        audit(conn, actor, "label_suspects", ranking.model_name, **details)


def listed(*, conn: psycopg.Connection, model_name: str, limit: int = 100) -> list[SuspectRow]:
    """The model's current ranking, most likely errors first."""
    rows = conn.execute(
        "SELECT rank, item_id, prediction_id, label, suggested, quality FROM label_suspects"
        " WHERE model_name = %s ORDER BY rank LIMIT %s",
        (model_name, limit),
    ).fetchall()
    return [SuspectRow(int(r[0]), r[1], r[2], r[3], r[4], float(r[5])) for r in rows]
