"""How well the quality tools catch a careless reviewer and the labels that are probably wrong.

    python -m experiments.reviewer_quality [--items 2000] [--trials 200] [--folds 5] [--out docs/reviewer-quality.json]

Three careful reviewers (2% of their labels wrong, another class drawn uniformly) and a careless one
(30%), as the loop demo's simulated reviewers answer:

1. Gold items: each reviewer answers gold items one after another; the rule `GET /admin/reviewers`
   applies (`feedback.review.quality.gold_flagged`: at least 10 answers, and the upper end of
   Wilson's 95% interval of their gold accuracy below the target, 0.9 by default) says after how
   many answers each is first flagged, and how often, over `--trials` runs.
2. Settled labels: `--items` predictions of a 10-class model (right 70% of the time) on a throwaway
   database, each judged by two, then by three of the four reviewers drawn at random, through the
   verdict code; the accuracy against the truth of the majority vote (ties broken at random) and
   of the labels weighted by reliability (`feedback.review.weighting`, Dawid-Skene).
3. Label errors: 5% of the digits model's original training labels flipped; confident learning on
   out-of-sample probabilities (`--folds`, the model's own trainer and protocol) ranks the rows;
   how many flipped rows its top k holds, at what precision, against chance.

Prints the tables in Markdown and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import psycopg

from experiments.reviewers import Reviewer, judge_all, log_items
from feedback.datasets import bundled_originals
from feedback.migrate import migrate
from feedback.review.quality import Targets, gold_flagged
from feedback.review.weighting import dawid_skene, judged
from harness import throwaway_database
from models import builtin, digits
from models.label_errors import out_of_sample, rank
from models.pipeline import trainer_of
from models.train import TrainConfig
from models.trainers import Examples

logger = logging.getLogger("reviewer_quality")

CAREFUL = tuple(Reviewer(f"careful-{i}", 0.02) for i in range(3))
CARELESS = Reviewer("careless", 0.30)
FLIPPED_SHARE = 0.05


def answers_until_flagged(error_rate: float, *, target: float, limit: int, rng: np.random.Generator) -> int | None:
    """Gold answers one reviewer gives until flagged (None: not within `limit`)."""
    right = 0
    for n in range(1, limit + 1):
        right += int(rng.random() >= error_rate)
        if gold_flagged(right, n, target):
            return n
    return None


def gold_figures(trials: int, limit: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    target = Targets().min_gold_accuracy
    assert target is not None
    figures = []
    for reviewer in (CAREFUL[0], CARELESS):
        runs = [answers_until_flagged(reviewer.error_rate, target=target, limit=limit, rng=rng) for _ in range(trials)]
        flagged = sorted(n for n in runs if n is not None)
        figures.append(
            {
                "reviewer": reviewer.name,
                "error_rate": reviewer.error_rate,
                "flagged_share": len(flagged) / trials,
                "median": float(np.median(flagged)) if flagged else None,
                "p90": float(np.percentile(flagged, 90)) if flagged else None,
            }
        )
    return figures


def majority(opinions: dict[int, str], rng: np.random.Generator) -> str:
    """The most frequent opinion; a tie is broken at random."""
    counts = Counter(opinions.values())
    best = max(counts.values())
    return str(rng.choice(sorted(o for o, c in counts.items() if c == best)))


def settled_figures(server: str, items: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    classes = digits.CLASS_NAMES
    figures = []
    for per_item in (2, 3):
        with throwaway_database(server, kind="quality") as url, psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
            logged = log_items(conn, model_name="sim", classes=classes, n=items, model_accuracy=0.7, rng=rng)
            judge_all(conn, logged, [*CAREFUL, CARELESS], per_item=per_item, classes=classes, rng=rng)
            found = judged(conn=conn, model_name="sim", watermark=None)
            weighted = dawid_skene(found)
        truth = {i.id: i.truth for i in logged}
        voted = {i.id: majority(i.opinions, rng) for i in found}
        weighed = {i.id: weighted.labels[i.id][0] for i in found}
        split = [i.id for i in found if len(set(i.opinions.values())) > 1]
        figures.append(
            {
                "reviewers_per_item": per_item,
                "items": len(found),
                "disagreements": len(split),
                "majority": _accuracy(list(truth), truth, voted),
                "weighted": _accuracy(list(truth), truth, weighed),
                "majority_on_disagreements": _accuracy(split, truth, voted),
                "weighted_on_disagreements": _accuracy(split, truth, weighed),
            }
        )
        logger.info("settled labels, %d reviewers per item: %s", per_item, figures[-1])
    return figures


def _accuracy(ids: Sequence[Any], truth: dict[Any, str], labels: dict[Any, str]) -> float:
    return sum(labels[i] == truth[i] for i in ids) / len(ids) if ids else float("nan")


def label_error_figures(folds: int, ks: Sequence[int], rng: np.random.Generator) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        found = bundled_originals(builtin.DEFAULT_MODEL_NAME, Path(scratch) / "split.json")
    assert found is not None and found.validation is not None
    train, held = found.train, found.validation
    labels = np.array([int(x) for x in train.labels], dtype=np.int64)
    flips = rng.choice(len(labels), round(FLIPPED_SHARE * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[flips] = (labels[flips] + 1 + rng.integers(9, size=len(flips))) % 10
    spec = builtin.spec_of(builtin.DEFAULT_MODEL_NAME)
    inputs = np.stack([np.asarray(x, dtype=np.float32) for x in train.inputs])
    validation = Examples(
        np.stack([np.asarray(x, dtype=np.float32) for x in held.inputs]),
        np.array([int(x) for x in held.labels], dtype=np.int64),
    )
    probabilities = out_of_sample(
        spec,
        trainer_of(spec),
        Examples(inputs, noisy),
        validation,
        config=TrainConfig(),
        folds=folds,
        on_fold=lambda k, n: logger.info("fold %d of %d trained", k, n),
    )
    ranked = [s.index for s in rank(noisy, probabilities)]
    injected = {int(i) for i in flips}
    at = {}
    for k in sorted({*ks, len(injected)}):
        hits = len(set(ranked[:k]) & injected)
        at[str(k)] = {"found": hits, "precision": hits / k if k else float("nan")}
    return {
        "rows": len(labels),
        "injected": len(injected),
        "flagged": len(ranked),
        "found_among_flagged": len(set(ranked) & injected),
        "chance_precision": len(injected) / len(labels),
        "at_k": at,
    }


def _print(gold: list[dict[str, Any]], settled: list[dict[str, Any]], errors: dict[str, Any], limit: int) -> None:
    click.echo(
        "| reviewer | error rate | flagged within " + f"{limit} gold answers | median answers | 90th percentile |"
    )
    click.echo("|---|---|---|---|---|")
    for g in gold:
        median, p90 = ("-", "-") if g["median"] is None else (f"{g['median']:.0f}", f"{g['p90']:.0f}")
        click.echo(f"| {g['reviewer']} | {g['error_rate']:.0%} | {g['flagged_share']:.1%} | {median} | {p90} |")
    click.echo(
        "\n| reviewers per item | items | with disagreement | majority vote | weighted (Dawid-Skene) |"
        " majority on disagreements | weighted on disagreements |"
    )
    click.echo("|---|---|---|---|---|---|---|")
    for s in settled:
        click.echo(
            f"| {s['reviewers_per_item']} | {s['items']} | {s['disagreements']} | {s['majority']:.3f} | "
            f"{s['weighted']:.3f} | {s['majority_on_disagreements']:.3f} | {s['weighted_on_disagreements']:.3f} |"
        )
    click.echo(
        f"\n{errors['injected']} of {errors['rows']} labels flipped; {errors['flagged']} rows flagged, "
        f"{errors['found_among_flagged']} of them flipped (chance precision {errors['chance_precision']:.3f})"
    )
    click.echo("\n| top k | flipped rows found | precision |\n|---|---|---|")
    for k, f in errors["at_k"].items():
        click.echo(f"| {k} | {f['found']} | {f['precision']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--gold-limit", type=int, default=500)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/reviewer-quality.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(args.seed)
    gold = gold_figures(args.trials, args.gold_limit, rng)
    settled = settled_figures(args.postgres, args.items, rng)
    errors = label_error_figures(args.folds, (25, 50, 100), rng)
    _print(gold, settled, errors, args.gold_limit)
    args.out.write_text(json.dumps({"gold": gold, "settled": settled, "label_errors": errors}, indent=2) + "\n")
    logger.info("figures written to %s", args.out)


if __name__ == "__main__":
    main()
