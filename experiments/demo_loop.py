"""`loop demo-loop`: how much does human review improve a model, measured through the real HTTP API.

For each sampling strategy, on a database and key prefix of its own:
1. a first model is trained on a small, class-skewed part of the original training rows (none of
   one class) and becomes champion; the frozen validation split is the yardstick throughout;
2. `loop serve` starts; the rest of the training rows arrive as live traffic on `POST /predict`,
   a share in each round;
3. simulated reviewers claim items over the review API with the strategy (least confident first,
   or random), answer from the true labels with an error rate, and a share of the items gets two
   reviewers, so disputes happen and an admin resolves them (with the true label);
4. each round compiles a training version (the first model's rows plus every reviewed item),
   retrains it with the fixed protocol, gates it against the champion, and on promotion waits until
   the running service serves the new champion.
Every label a reviewer or the admin gives is a label spent. The table, a CSV and a PNG of validation
accuracy against labels spent (one line per strategy) end up in the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np
import psycopg

import harness
from feedback import review as rs
from feedback.champion import champion as current_champion
from feedback.datasets import store as dataset_store
from feedback.keys import Keys
from feedback.migrate import migrate
from models import builtin
from service.settings import Settings

logger = logging.getLogger(__name__)
STRATEGIES = (rs.Strategy.LEAST_CONFIDENT, rs.Strategy.RANDOM)
TARGET_ACCURACY = 0.97
START_BELOW = 0.90
LABEL_SHARE_LIMIT = 0.30


@dataclass(frozen=True)
class DemoConfig:
    rounds: int = 5
    labels_per_round: int = 70  # reviewer verdicts per round (admin resolutions come on top)
    traffic_rows: int | None = None  # None: every training row the first model was not trained on
    reviewers: int = 3
    error_rate: float = 0.02  # how often a simulated reviewer gives a wrong label
    overlap_share: float = 0.1  # share of items that ask for two reviews (the service's default)
    claim_size: int = 10
    request_size: int = 16  # samples per POST /predict
    epochs: int | None = None  # None: the protocol's own
    margin: float = 0.0
    seed: int = 0
    initial_per_class: tuple[int, ...] = builtin.DEMO_INITIAL_PER_CLASS


@dataclass(frozen=True)
class Servers:
    """Where the demo's databases and key prefixes live."""

    postgres: str  # a URL on the server; each strategy gets a database of its own there
    redis: str


@dataclass(frozen=True)
class RoundResult:
    strategy: str
    round: int
    traffic: int  # predictions sent so far
    labels: int  # labels spent so far: reviewer verdicts plus admin resolutions
    items_reviewed: int  # distinct items with at least one verdict so far
    share_reviewed: float  # items_reviewed / traffic
    disputes: int  # disputes resolved by the admin so far
    fleiss_kappa: float | None
    candidate_accuracy: float | None  # the model trained this round, on the frozen validation split
    accuracy: float  # the champion's after the gate
    decision: str
    champion: str
    dataset_id: str


@dataclass
class StrategyRun:
    strategy: str
    model_name: str
    database_url: str
    rounds: list[RoundResult] = field(default_factory=list)
    datasets: list[dataset_store.DatasetVersion] = field(default_factory=list)
    served_after: str | None = None  # the version a prediction carried after the last round


# -- the reviewers ---------------------------------------------------------------------------------


def simulated_verdict(
    rng: np.random.Generator, *, model_label: str, true_label: str, class_names: Sequence[str], error_rate: float
) -> dict[str, Any]:
    """A reviewer's verdict from the true label, wrong (another class at random) with `error_rate`."""
    answer = true_label
    if rng.random() < error_rate:
        answer = str(rng.choice([c for c in class_names if c != true_label]))
    if answer == model_label:
        return {"verdict": "correct"}
    return {"verdict": "wrong", "label": answer}


def judge_claimed(
    http: httpx.Client,
    token: str,
    claim: dict[str, Any],
    *,
    truth: dict[str, str],
    rng: np.random.Generator,
    class_names: Sequence[str],
    error_rate: float,
) -> list[dict[str, Any]]:
    """One reviewer claims items over HTTP (`claim`: the claim's body) and judges each from its true
    label (`truth`, by prediction id) with `simulated_verdict`; the items judged."""
    claimed = http.post("/review/claim", json=claim, headers=_bearer(token))
    claimed.raise_for_status()
    items: list[dict[str, Any]] = claimed.json()
    if items:
        judge = functools.partial(simulated_verdict, rng, class_names=class_names, error_rate=error_rate)
        verdicts = [
            {"prediction_id": item["id"], **judge(model_label=item["label"], true_label=truth[item["id"]])}
            for item in items
        ]
        http.post("/review/verdicts", json={"verdicts": verdicts}, headers=_bearer(token)).raise_for_status()
    return items


# -- one strategy ----------------------------------------------------------------------------------


class Demo:
    """Runs the loop for one strategy against a `loop serve` of its own."""

    def __init__(
        self, config: DemoConfig, servers: Servers, strategy: rs.Strategy, out: Path, *, echo: Callable[[str], None]
    ) -> None:
        from feedback import datasets as ds
        from feedback.tracking import Tracking

        self.config = config
        self.strategy = strategy
        self.out = out
        self.echo = echo
        run = uuid.uuid4().hex[:6]
        self.task = task = builtin.demo_task()
        self.model_name = f"{task.model_name}-demo-{strategy.value.replace('_', '-')}-{run}"
        self.keys = Keys(f"demo-{run}")
        self.database = f"loop_demo_{strategy.value}_{run}"
        self.server_url = servers.postgres
        self.database_url = harness.on_database(servers.postgres, self.database)
        self.redis_url = servers.redis
        self.var_dir = out / f"var-{strategy.value}"
        self.rng = np.random.default_rng(config.seed)
        split_path = self.var_dir / "validation" / "split.json"
        train_rows, _ = task.split(split_path, seed=config.seed)
        initial = task.initial(train_rows, config.initial_per_class, seed=config.seed)
        rest = np.setdiff1d(np.asarray(train_rows), initial)
        # The same traffic, in the same order, for every strategy: equal budgets compare fairly.
        order = np.random.default_rng(config.seed).permutation(rest)
        self.traffic = order[: config.traffic_rows] if config.traffic_rows is not None else order
        originals = ds.bundled_originals(task.model_name, split_path, seed=config.seed, train=initial)
        assert originals is not None
        self.originals = originals
        self.schema = ds.LabelSchema.of(task.spec)
        self.tracking = Tracking(
            tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}",
            artifact_uri=(out / "mlartifacts").resolve().as_uri(),
        )
        self.truth: dict[str, str] = {}  # prediction id -> true label
        self.labels_spent = 0
        self.disputes = 0
        self.reviewed: set[str] = set()

    def run(self) -> StrategyRun:
        # The dataset compiler (pyarrow) and the trainer (torch) load here, not on `loop --help`.
        from feedback import datasets as ds

        result = StrategyRun(strategy=self.strategy.value, model_name=self.model_name, database_url=self.database_url)
        self._create_database()
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            admin, _ = rs.create_user(conn=conn, name="demo-admin", role=rs.Role.ADMIN)
            tokens = [
                rs.create_user(conn=conn, name=f"reviewer-{i}", role=rs.Role.REVIEWER)[1]
                for i in range(self.config.reviewers)
            ]
            admin_token = rs.create_user(conn=conn, name="demo-resolver", role=rs.Role.ADMIN)[1]
            validation = ds.freeze_validation(
                conn=conn,
                model_name=self.model_name,
                originals=self.originals,
                schema=self.schema,
                root_url=self._datasets_root(),
                actor=admin,
            )
            self.echo(f"[{self.strategy.value}] training the first model on {len(self.originals.train)} rows")
            first = self._compile_and_retrain(conn, admin, validation, round_=0, announce=False)
            result.rounds.append(first[0])
            result.datasets.append(first[1])
        with self._service() as http:
            for round_ in range(1, self.config.rounds + 1):
                self._send_traffic(http, round_)
                self._wait_ingested()
                self._review(http, tokens)
                self._resolve_disputes(http, admin_token)
                kappa = http.get("/review/agreement", headers=_bearer(tokens[0])).json()["fleiss_kappa"]
                with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
                    row, version = self._compile_and_retrain(conn, admin, validation, round_=round_, kappa=kappa)
                result.rounds.append(row)
                result.datasets.append(version)
                self._wait_served(http, row.champion)
                self._print(row)
            probe = http.post("/predict", json={"samples": [self.task.inputs[int(self.traffic[0])].tolist()]})
            result.served_after = probe.json()["predictions"][0]["model_version"]
        return result

    # -- steps -------------------------------------------------------------------------------------

    def _compile_and_retrain(
        self,
        conn: psycopg.Connection,
        admin: rs.User,
        validation: dataset_store.DatasetVersion,
        *,
        round_: int,
        kappa: float | None = None,
        announce: bool = True,
    ) -> tuple[RoundResult, dataset_store.DatasetVersion]:
        from feedback import datasets as ds
        from feedback.retrain import retrain
        from models.train import TrainConfig

        version = ds.compile_training(
            conn=conn,
            model_name=self.model_name,
            schema=self.schema,
            originals=self.originals,
            validation=validation,
            root_url=self._datasets_root(),
            actor=admin,
        )
        config = TrainConfig() if self.config.epochs is None else TrainConfig(epochs=self.config.epochs)
        with click.progressbar(
            length=config.epochs, label=f"round {round_}: training on {version.rows} rows", file=sys.stderr
        ) as bar:
            outcome = retrain(
                conn=conn,
                model_name=self.model_name,
                dataset=version,
                tracking=self.tracking,
                config=config,
                margin=self.config.margin,
                announcer=self._announce if announce else None,
                on_epoch=lambda _: bar.update(1),
                spec=self.task.spec,
            )
        champion = current_champion(conn=conn, model_name=self.model_name)
        assert champion is not None and champion.accuracy is not None  # retrain recorded a decision
        traffic = len(self.truth)
        row = RoundResult(
            strategy=self.strategy.value,
            round=round_,
            traffic=traffic,
            labels=self.labels_spent,
            items_reviewed=len(self.reviewed),
            share_reviewed=len(self.reviewed) / traffic if traffic else 0.0,
            disputes=self.disputes,
            fleiss_kappa=kappa,
            candidate_accuracy=outcome.evaluation.accuracy,
            accuracy=champion.accuracy,
            decision=outcome.promotion.decision.value,
            champion=champion.model_version,
            dataset_id=version.id,
        )
        if round_ == 0:
            self._print(row)
        return row, version

    def _send_traffic(self, http: httpx.Client, round_: int) -> None:
        rounds = self.config.rounds
        batch = self.traffic[len(self.traffic) * (round_ - 1) // rounds : len(self.traffic) * round_ // rounds]
        size = self.config.request_size
        with click.progressbar(length=len(batch), label=f"round {round_}: traffic", file=sys.stderr) as bar:
            for start in range(0, len(batch), size):
                rows = batch[start : start + size]
                response = http.post("/predict", json={"samples": self.task.inputs[rows].tolist()})
                response.raise_for_status()
                for row, answer in zip(rows, response.json()["predictions"], strict=True):
                    self.truth[answer["id"]] = self.task.class_names[int(self.task.labels[row])]
                bar.update(len(rows))

    def _wait_ingested(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            while True:
                stored = conn.execute("SELECT count(*) FROM predictions").fetchone()
                if stored is not None and stored[0] >= len(self.truth):
                    return
                if time.monotonic() > deadline:
                    raise click.ClickException(f"the ingest worker stored {stored} of {len(self.truth)} predictions")
                time.sleep(0.2)

    def _review(self, http: httpx.Client, tokens: Sequence[str]) -> None:
        budget = self.config.labels_per_round
        spent = 0
        with click.progressbar(length=budget, label="reviewing", file=sys.stderr) as bar:
            while spent < budget:
                progressed = False
                for token in tokens:
                    want = min(self.config.claim_size, budget - spent)
                    if want <= 0:
                        break
                    claim = {"count": want, "strategy": self.strategy.value}
                    items = judge_claimed(
                        http,
                        token,
                        claim,
                        truth=self.truth,
                        rng=self.rng,
                        class_names=self.task.class_names,
                        error_rate=self.config.error_rate,
                    )
                    if not items:
                        continue
                    self.reviewed.update(item["id"] for item in items)
                    spent += len(items)
                    bar.update(len(items))
                    progressed = True
                if not progressed:
                    break  # nothing left to claim
        self.labels_spent += spent

    def _resolve_disputes(self, http: httpx.Client, token: str) -> None:
        while True:
            page = http.get("/review/items", params={"status": "disputed", "limit": 100}, headers=_bearer(token))
            page.raise_for_status()
            items = page.json()["items"]
            if not items:
                return
            for item in items:
                body = {"label": self.truth[item["id"]], "reason": "demo: the admin settles a dispute"}
                http.post(f"/review/items/{item['id']}/resolve", json=body, headers=_bearer(token)).raise_for_status()
                self.labels_spent += 1
                self.disputes += 1

    def _wait_served(self, http: httpx.Client, version: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while (served := http.get(f"/models/{self.model_name}").json().get("version")) != version:
            if time.monotonic() > deadline:
                raise click.ClickException(f"the service still serves {served}, not the champion {version}")
            time.sleep(0.2)

    def _print(self, row: RoundResult) -> None:
        self.echo(_table_line(row))

    # -- servers -------------------------------------------------------------------------------------

    def _datasets_root(self) -> str:
        return str((self.out / "datasets").resolve())

    def _create_database(self) -> None:
        harness.create_database(self.server_url, name=self.database)
        with psycopg.connect(self.database_url, connect_timeout=5) as conn:
            migrate(conn)

    def drop_database(self) -> None:
        harness.drop_database(self.server_url, self.database)

    def _announce(self, model_name: str, version: str) -> None:
        from feedback.use_cases import announcer

        announcer(self.redis_url, self.keys)(model_name, version)

    @contextlib.contextmanager
    def _service(self) -> Iterator[httpx.Client]:
        """`loop serve` on a free port, for this strategy's model, database and key prefix."""
        serving = harness.loop_serve(
            f"{self.model_name}:champion",
            database_url=self.database_url,
            redis_url=self.redis_url,
            prefix=self.keys.prefix,
            var_dir=self.var_dir,
            log=self.out / f"serve-{self.strategy.value}.log",
            overrides={
                "LOOP_HOST": "127.0.0.1",
                "LOOP_WORKERS": "1",
                "LOOP_REVIEW_OVERLAP": "2",
                "LOOP_REVIEW_OVERLAP_SHARE": str(self.config.overlap_share),
            },
        )
        with serving as url, httpx.Client(base_url=url, timeout=60) as http:
            yield http


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the report ------------------------------------------------------------------------------------

HEADER = (
    f"{'strategy':<16}{'round':>5}{'traffic':>9}{'labels':>8}{'reviewed':>10}{'kappa':>7}"
    f"{'candidate':>11}{'champion':>10}  decision"
)


def _table_line(row: RoundResult) -> str:
    kappa = "-" if row.fleiss_kappa is None else f"{row.fleiss_kappa:.2f}"
    candidate = "-" if row.candidate_accuracy is None else f"{row.candidate_accuracy:.4f}"
    return (
        f"{row.strategy:<16}{row.round:>5}{row.traffic:>9}{row.labels:>8}{row.share_reviewed:>10.1%}{kappa:>7}"
        f"{candidate:>11}{row.accuracy:>10.4f}  {row.decision}"
    )


def write_report(runs: Sequence[StrategyRun], out: Path) -> tuple[Path, Path]:
    """The rounds of every strategy as CSV, and validation accuracy against labels spent as PNG."""
    from models import plots

    rows = [r for run in runs for r in run.rounds]
    csv_path = out / "demo_loop.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    series = {run.strategy.replace("_", " "): [(r.labels, r.accuracy) for r in run.rounds] for run in runs}
    png = plots.save_png(plots.accuracy_against_labels(series, target=TARGET_ACCURACY), out / "demo_loop.png")
    return csv_path, png


def verdict_on_targets(runs: Sequence[StrategyRun]) -> list[str]:
    """The issue's targets, each as a line saying whether it was met and with what figure."""
    lines = []
    by_name = {run.strategy: run for run in runs}
    for run in runs:
        first, last = run.rounds[0], run.rounds[-1]
        reached = next((r for r in run.rounds if r.accuracy >= TARGET_ACCURACY), None)
        target = (
            f"{TARGET_ACCURACY:.0%} reached in round {reached.round} with {reached.labels} labels"
            if reached
            else f"{TARGET_ACCURACY:.0%} not reached"
        )
        share = last.labels / max(last.traffic, 1)
        lines.append(
            f"{run.strategy}: {first.accuracy:.4f} -> {last.accuracy:.4f} in {last.round} rounds; "
            f"labels {last.labels} for {last.traffic} predictions ({share:.1%}); {target}"
        )
    lc, random = by_name.get(rs.Strategy.LEAST_CONFIDENT.value), by_name.get(rs.Strategy.RANDOM.value)
    if lc is not None and random is not None:
        above = [a.accuracy > b.accuracy for a, b in zip(lc.rounds[2:], random.rounds[2:], strict=False)]
        lines.append(f"least confident above random in {sum(above)} of {len(above)} rounds after the first")
    return lines


# -- the command -----------------------------------------------------------------------------------


@contextlib.contextmanager
def demo_servers(settings: Settings, var_dir: Path) -> Iterator[Servers]:
    """The configured servers, else an embedded Postgres and Redis of the demo's own (free ports)."""
    from harness import embedded

    with contextlib.ExitStack() as stack:
        postgres = settings.database_url or stack.enter_context(embedded.postgres(var_dir / "postgres")).url
        redis_url = settings.redis_url or stack.enter_context(embedded.redis(var_dir / "redis")).url
        yield Servers(postgres=postgres, redis=redis_url)


def run_demo(
    config: DemoConfig,
    servers: Servers,
    out: Path,
    *,
    strategies: Sequence[rs.Strategy] = STRATEGIES,
    keep: bool = False,
    echo: Callable[[str], None] = click.echo,
) -> list[StrategyRun]:
    out.mkdir(parents=True, exist_ok=True)
    echo(HEADER)
    runs = []
    for strategy in strategies:
        demo = Demo(config, servers, strategy, out, echo=echo)
        try:
            runs.append(demo.run())
        finally:
            if not keep:
                demo.drop_database()
    return runs


@click.command("demo-loop")
@click.option("--rounds", type=click.IntRange(min=1), default=DemoConfig.rounds, show_default=True)
@click.option(
    "--labels-per-round",
    type=click.IntRange(min=1),
    default=DemoConfig.labels_per_round,
    show_default=True,
    help="Reviewer verdicts per round (admin resolutions come on top).",
)
@click.option(
    "--traffic",
    "traffic_rows",
    type=click.IntRange(min=1),
    default=None,
    help="Predictions sent in all (default: every training row the first model has not seen).",
)
@click.option("--error-rate", type=click.FloatRange(0, 1), default=DemoConfig.error_rate, show_default=True)
@click.option(
    "--overlap-share",
    type=click.FloatRange(0, 1),
    default=DemoConfig.overlap_share,
    show_default=True,
    help="Share of items that get two reviewers.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the protocol's epochs.")
@click.option(
    "--strategy",
    "strategy_names",
    multiple=True,
    type=click.Choice([s.value for s in STRATEGIES]),
    help="Run only these strategies (default: both).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the table, plot, datasets and MLflow runs (default var/demo-loop).",
)
@click.option("--keep", is_flag=True, help="Keep each strategy's database afterwards.")
def demo_loop(  # noqa: PLR0917  (each option is an argument, as click passes them)
    rounds: int,
    labels_per_round: int,
    traffic_rows: int | None,
    error_rate: float,
    overlap_share: float,
    epochs: int | None,
    strategy_names: tuple[str, ...],
    seed: int,
    out: Path | None,
    keep: bool,
) -> None:
    """Measure how much review improves a model: a skewed first model, live traffic, simulated
    reviewers, a retrain and gate per round; table, CSV and PNG of accuracy against labels spent."""
    settings = Settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    out = out or settings.var_dir / "demo-loop"
    config = DemoConfig(
        rounds=rounds,
        labels_per_round=labels_per_round,
        traffic_rows=traffic_rows,
        error_rate=error_rate,
        overlap_share=overlap_share,
        epochs=epochs,
        seed=seed,
    )
    strategies = [rs.Strategy(s) for s in strategy_names] or list(STRATEGIES)
    with demo_servers(settings, out / "servers") as servers:
        runs = run_demo(config, servers, out, strategies=strategies, keep=keep)
    csv_path, png = write_report(runs, out)
    for line in verdict_on_targets(runs):
        click.echo(line)
    click.echo(f"table: {csv_path}\nplot: {png}")
