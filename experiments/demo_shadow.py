"""`loop demo-shadow`: the frozen-set gate alone promotes the wrong candidate when live traffic has
moved away from the validation set; a shadow judged by reviewers catches it. Measured through the
real HTTP API.

1. Three versions of the demo model are trained with the fixed protocol: the champion (on part of
   the training rows, a few of them drifted), candidate A (on every training row, none drifted:
   better on the frozen validation set, worse on drifted traffic) and candidate B (on every row,
   all drifted: the other way round). The frozen-set gate compares each with the champion.
2. `loop serve` serves the champion; live traffic is the validation set's samples drifted (each
   digit moved by one or two pixels, as no training row of the original data is).
3. For each candidate: an admin starts it as a shadow of every request, the traffic is sent,
   simulated reviewers judge items in the "where they disagree" order (blind: they see one label,
   not whose), and after every `step` judged items the evidence is read back from
   `GET /admin/shadow`. It is decided (`POST /admin/shadow/decide`, policy `better`) as soon as the
   judged items settle it either way at the policy's significance, or when `max_judged` is spent.
A table, a CSV of every look at the evidence and a PNG (both accuracies and McNemar's p against
judged items, per candidate) end up in the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np
import psycopg
from numpy.typing import NDArray

import harness
from experiments.demo_loop import Servers, demo_servers, judge_claimed
from feedback import review as rs
from feedback.keys import Keys
from feedback.migrate import migrate
from models import builtin
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowDemoConfig:
    step: int = 10  # judged items between looks at the evidence
    max_judged: int = 300  # per candidate, when the evidence settles nothing sooner
    min_judged: int = 30  # the policy's minimum (LOOP_SHADOW_MIN_JUDGED)
    alpha: float = 0.05  # the policy's significance (LOOP_SHADOW_ALPHA)
    reviewers: int = 2
    error_rate: float = 0.02  # how often a simulated reviewer gives a wrong label
    request_size: int = 8  # samples per POST /predict
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """Which training rows a version learns from: the first `originals` share as they are, the
    next `drifted` share moved as live traffic is."""

    role: str
    originals: float
    drifted: float
    description: str


CHAMPION = Recipe("champion", 0.4, 0.2, "40% of the training rows, and 20% more drifted")
CANDIDATES = (
    Recipe("A", 1.0, 0.0, "every training row as it is: better on the frozen set"),
    Recipe("B", 0.0, 1.0, "every training row drifted: better on today's traffic"),
)


@dataclass(frozen=True)
class Look:
    """The evidence as `GET /admin/shadow` gave it after some judged items."""

    candidate: str
    judged: int
    champion_accuracy: float | None
    shadow_accuracy: float | None
    only_champion_right: int
    only_shadow_right: int
    p_value: float


@dataclass
class Version:
    role: str
    version: str
    description: str
    frozen_accuracy: float  # on the frozen validation version
    traffic_accuracy: float  # on every live sample sent (known to the demo only: it holds the truth)
    gate_alone: str = "-"  # what the frozen-set gate alone decides against the champion
    looks: list[Look] = field(default_factory=list)
    significant_at: int | None = None  # judged items when McNemar's p first fell below the significance
    settled_at: int | None = None  # ... and the policy's minimum of judged items was reached too
    decision: str = "-"  # the shadow decision recorded by the service
    reason: str = ""


# -- the demo --------------------------------------------------------------------------------------


class ShadowDemo:
    def __init__(
        self, config: ShadowDemoConfig, postgres: str, redis_url: str, out: Path, *, echo: Callable[[str], None]
    ) -> None:
        from feedback import datasets as ds

        self.config, self.out, self.echo = config, out, echo
        run = uuid.uuid4().hex[:6]
        self.task = task = builtin.demo_task()
        self.model_name = f"{task.model_name}-demo-shadow-{run}"
        self.keys = Keys(f"demo-shadow-{run}")
        self.server_url, self.redis_url = postgres, redis_url
        self.database = f"loop_demo_shadow_{run}"
        self.database_url = harness.on_database(postgres, self.database)
        self.var_dir = out / "var"
        split_path = self.var_dir / "validation" / "split.json"
        self.train_rows, self.validation_rows = (np.asarray(r) for r in task.split(split_path, seed=config.seed))
        originals = ds.bundled_originals(task.model_name, split_path, seed=config.seed)
        assert originals is not None
        self.originals = originals
        self.rng = np.random.default_rng(config.seed)
        self.traffic = task.drifted(self.validation_rows, seed=config.seed + 1)
        self.truth: dict[str, str] = {}
        self.since: str | None = None  # when the shadow being judged started

    def run(self) -> list[Version]:
        harness.create_database(self.server_url, name=self.database)
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:
            migrate(conn)
            self.admin, _ = rs.create_user(conn=conn, name="demo-admin", role=rs.Role.ADMIN)
            self.admin_token = rs.create_user(conn=conn, name="demo-shadow-admin", role=rs.Role.ADMIN)[1]
            self.tokens = [
                rs.create_user(conn=conn, name=f"reviewer-{i}", role=rs.Role.REVIEWER)[1]
                for i in range(self.config.reviewers)
            ]
            versions = self._train_all(conn)
        with self._service() as http:
            for candidate in versions[1:]:
                self._shadow(http, candidate)
        return versions

    # -- training and the frozen-set gate ----------------------------------------------------------

    def _train_all(self, conn: psycopg.Connection) -> list[Version]:
        from feedback import datasets as ds
        from feedback.champion import Decision, evaluation_on, gate, record_promotion

        validation = ds.freeze_validation(
            conn=conn,
            model_name=self.model_name,
            originals=self.originals,
            schema=ds.LabelSchema.of(self.task.spec),
            root_url=str((self.out / "datasets").resolve()),
            actor=self.admin,
        )
        versions = []
        for recipe in (CHAMPION, *CANDIDATES):
            stored = self._train(recipe)
            versions.append(
                Version(
                    role=recipe.role,
                    version=stored.version,
                    description=recipe.description,
                    frozen_accuracy=evaluation_on(conn, self.model_name, stored.version, validation),
                    traffic_accuracy=self._accuracy_on_traffic(stored),
                )
            )
        champion = versions[0]
        record_promotion(
            conn=conn,
            model_name=self.model_name,
            model_version=champion.version,
            decision=Decision.BASELINE,
            reason="the shadow demo's champion",
            validation_id=validation.id,
            accuracy=champion.frozen_accuracy,
            actor=self.admin,
        )
        for candidate in versions[1:]:
            passed, _ = gate(candidate.frozen_accuracy, champion.frozen_accuracy, 0.0)
            candidate.gate_alone = "promoted" if passed else "rejected"
        for v in versions:
            self.echo(
                f"{v.role:<9} {v.version}: frozen set {v.frozen_accuracy:.4f}, drifted traffic {v.traffic_accuracy:.4f}"
                f"{'' if v.role == 'champion' else f'; the frozen-set gate alone: {v.gate_alone}'}"
            )
        return versions

    def _train(self, recipe: Recipe) -> Any:
        from models.pipeline import train_and_store
        from models.train import TrainConfig
        from models.trainers import Examples

        task, rows = self.task, self.train_rows
        plain = rows[: round(recipe.originals * len(rows))]
        start = len(plain) if recipe.originals < 1 else 0
        moved = rows[start : start + round(recipe.drifted * len(rows))]
        inputs = np.concatenate([task.inputs[plain], task.drifted(moved, seed=self.config.seed + 2)])
        labels = np.concatenate([task.labels[plain], task.labels[moved]])
        validation = Examples(task.inputs[self.validation_rows], task.labels[self.validation_rows])
        self.echo(f"training {recipe.role} on {len(labels)} rows: {recipe.description}")
        return train_and_store(
            name=self.model_name,
            spec=task.spec,
            train=Examples(inputs, labels),
            validation=validation,
            dataset_id=f"demo-shadow-{recipe.role}",
            validation_id=f"demo-shadow-seed-{self.config.seed}",
            config=TrainConfig(seed=self.config.seed),
        ).stored

    def _accuracy_on_traffic(self, stored: Any) -> float:
        from models.evaluate import evaluate_stored

        labels = self.task.labels[self.validation_rows]
        evaluation, _ = evaluate_stored(stored, self.traffic, labels)
        return float(evaluation.accuracy)

    # -- one shadow --------------------------------------------------------------------------------

    def _shadow(self, http: httpx.Client, candidate: Version) -> None:
        admin = _bearer(self.admin_token)
        model = {"model": self.model_name}
        started = http.post(
            "/admin/shadow", params=model, json={"version": candidate.version, "share": 1.0}, headers=admin
        )
        started.raise_for_status()
        self.since = started.json()["started_at"]  # reviewers judge what this shadow saw
        self.echo(f"candidate {candidate.role} ({candidate.version}) shadows every request")
        self._send_traffic(http)
        while candidate.settled_at is None and (
            not candidate.looks or candidate.looks[-1].judged < self.config.max_judged
        ):
            if not self._review(http):
                break  # every shadowed item is judged
            look = self._look(http, candidate.role)
            candidate.looks.append(look)
            if candidate.significant_at is None and look.p_value < self.config.alpha:
                candidate.significant_at = look.judged
            candidate.settled_at = self._settled(look)
        decided = http.post("/admin/shadow/decide", params=model, headers=admin)
        decided.raise_for_status()
        promotion = decided.json()["promotion"]
        candidate.decision, candidate.reason = promotion["decision"], promotion["reason"]
        self.echo(f"candidate {candidate.role}: {candidate.decision} after {candidate.looks[-1].judged} judged items")
        if candidate.decision == "promoted":
            self._wait(
                lambda: http.get(f"/models/{self.model_name}").json().get("version") == candidate.version,
                "the service to serve the new champion",
            )

    def _send_traffic(self, http: httpx.Client) -> None:
        """The first drifted sample until the worker shadows it (it loads the shadow on the
        announcement), then every drifted sample, `request_size` a request; returns once the last
        one's shadow prediction is stored (the log is ingested in order)."""
        labels = self.task.labels[self.validation_rows]
        probes: list[str] = []

        def probed() -> bool:  # a probe answered before the announcement arrived is never shadowed: send another
            probes.append(self._predict(http, [0], labels)[0])
            return any(self._shadowed(http, probe) for probe in probes[-10:])

        self._wait(probed, "the worker to shadow what it answers")
        last = probes[-1]
        with click.progressbar(length=len(self.traffic), label="drifted traffic", file=sys.stderr) as bar:
            for start in range(0, len(self.traffic), self.config.request_size):
                rows = list(range(start, min(start + self.config.request_size, len(self.traffic))))
                last = self._predict(http, rows, labels)[-1]
                bar.update(len(rows))
        self._wait(lambda: self._shadowed(http, last), "every shadow prediction stored")

    def _predict(self, http: httpx.Client, rows: list[int], labels: NDArray[np.int64]) -> list[str]:
        """Send the drifted samples of `rows` in one request; their prediction ids."""
        response = http.post("/predict", json={"samples": self.traffic[rows].tolist()})
        response.raise_for_status()
        ids = [answer["id"] for answer in response.json()["predictions"]]
        for row, prediction_id in zip(rows, ids, strict=True):
            self.truth[prediction_id] = self.task.class_names[int(labels[row])]
        return ids

    def _shadowed(self, http: httpx.Client, prediction_id: str) -> bool:
        found = http.get(f"/predictions/{prediction_id}")
        return found.status_code == 200 and bool(found.json()["shadows"])

    def _review(self, http: httpx.Client) -> int:
        """`step` items judged in the disagree order by the reviewers in turn; how many were."""
        judged = 0
        for token in self.tokens:
            want = self.config.step - judged if token == self.tokens[-1] else self.config.step // len(self.tokens)
            if want <= 0:
                continue
            claim = {"count": want, "strategy": "disagree", "model_name": self.model_name, "created_from": self.since}
            items = judge_claimed(
                http,
                token,
                claim,
                truth=self.truth,
                rng=self.rng,
                class_names=self.task.class_names,
                error_rate=self.config.error_rate,
            )
            judged += len(items)
        return judged

    def _evidence(self, http: httpx.Client) -> dict[str, Any]:
        answer = http.get("/admin/shadow", params={"model": self.model_name}, headers=_bearer(self.admin_token))
        answer.raise_for_status()
        evidence: dict[str, Any] = answer.json()["evidence"] or {"shadowed": 0}
        return evidence

    def _look(self, http: httpx.Client, role: str) -> Look:
        e = self._evidence(http)
        return Look(
            candidate=role,
            judged=e["judged"],
            champion_accuracy=e["champion"]["value"],
            shadow_accuracy=e["shadow"]["value"],
            only_champion_right=e["only_champion_right"],
            only_shadow_right=e["only_shadow_right"],
            p_value=e["p_value"],
        )

    def _settled(self, look: Look) -> int | None:
        """The judged items at this look when they settle the question at the policy's significance."""
        decisive = look.judged >= self.config.min_judged and look.p_value < self.config.alpha
        return look.judged if decisive and look.only_champion_right != look.only_shadow_right else None

    def _wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise click.ClickException(f"timed out waiting for {what}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def _service(self) -> Iterator[httpx.Client]:
        serving = harness.loop_serve(
            f"{self.model_name}:champion",
            database_url=self.database_url,
            redis_url=self.redis_url,
            prefix=self.keys.prefix,
            var_dir=self.var_dir,
            log=self.out / "serve.log",
            overrides={
                "LOOP_HOST": "127.0.0.1",
                "LOOP_WORKERS": "1",
                "LOOP_REVIEW_OVERLAP_SHARE": "0",
                "LOOP_SHADOW_POLICY": "better",
                "LOOP_SHADOW_ALPHA": str(self.config.alpha),
                "LOOP_SHADOW_MIN_JUDGED": str(self.config.min_judged),
            },
        )
        with serving as url, httpx.Client(base_url=url, timeout=60) as http:
            yield http

    def drop_database(self) -> None:
        harness.drop_database(self.server_url, self.database)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the report ------------------------------------------------------------------------------------


def table(versions: list[Version]) -> list[str]:
    """The demo's table (Markdown), one row a version."""
    lines = [
        "| version | trained on | frozen set | drifted traffic | frozen-set gate alone | judged until p < 0.05"
        " | judged to decide | shadow decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in versions:
        significant, settled = (
            ("-", "-")
            if v.role == "champion"
            else (str(v.significant_at or "never"), str(v.settled_at or "not settled"))
        )
        lines.append(
            f"| {v.role} `{v.version}` | {v.description} | {v.frozen_accuracy:.4f} | {v.traffic_accuracy:.4f} "
            f"| {v.gate_alone} | {significant} | {settled} | {v.decision} |"
        )
    return lines


def caught(versions: list[Version]) -> list[str]:
    """Whether the demo showed what it is for: the gate alone promotes the candidate that is worse on
    today's traffic, and the shadow's judged items reject it (and promote the better one)."""
    champion, candidates = versions[0], versions[1:]
    lines = []
    for c in candidates:
        worse_live = c.traffic_accuracy < champion.traffic_accuracy
        wrong_gate = (c.gate_alone == "promoted") == worse_live
        right_shadow = (c.decision == "promoted") != worse_live
        lines.append(
            f"candidate {c.role}: {'worse' if worse_live else 'better'} on drifted traffic than the champion "
            f"({c.traffic_accuracy:.4f} against {champion.traffic_accuracy:.4f}); the frozen-set gate alone "
            f"{c.gate_alone} it ({'wrong' if wrong_gate else 'right'}); the shadow {c.decision} it "
            f"({'right' if right_shadow else 'wrong'}) after {c.looks[-1].judged if c.looks else 0} judged items"
        )
    return lines


def write_report(versions: list[Version], config: ShadowDemoConfig, out: Path) -> tuple[Path, Path]:
    """Every look at the evidence as CSV; both accuracies and McNemar's p against judged items as PNG."""
    from models import plots

    looks = [look for v in versions for look in v.looks]
    csv_path = out / "demo_shadow.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(looks[0])) if looks else ["candidate"])
        writer.writeheader()
        writer.writerows(asdict(look) for look in looks)
    figure = plots.shadow_evidence(
        {
            f"candidate {v.role}": [(k.judged, k.champion_accuracy, k.shadow_accuracy, k.p_value) for k in v.looks]
            for v in versions[1:]
        },
        alpha=config.alpha,
        min_judged=config.min_judged,
    )
    return csv_path, plots.save_png(figure, out / "demo_shadow.png")


def run_shadow_demo(
    config: ShadowDemoConfig,
    servers: Servers,
    out: Path,
    *,
    keep: bool = False,
    echo: Callable[[str], None] = click.echo,
) -> tuple[list[Version], str]:
    """The demo's versions, and its database's URL (dropped afterwards unless `keep`)."""
    out.mkdir(parents=True, exist_ok=True)
    demo = ShadowDemo(config, servers.postgres, servers.redis, out, echo=echo)
    try:
        return demo.run(), demo.database_url
    finally:
        if not keep:
            demo.drop_database()


@click.command("demo-shadow")
@click.option(
    "--step",
    type=click.IntRange(min=1),
    default=ShadowDemoConfig.step,
    show_default=True,
    help="Judged items between looks at the evidence.",
)
@click.option("--max-judged", type=click.IntRange(min=1), default=ShadowDemoConfig.max_judged, show_default=True)
@click.option("--error-rate", type=click.FloatRange(0, 1), default=ShadowDemoConfig.error_rate, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the table, CSV and plot (default var/demo-shadow).",
)
@click.option("--keep", is_flag=True, help="Keep the demo's database afterwards.")
def demo_shadow(  # noqa: PLR0917  (each option is an argument, as click passes them)
    step: int, max_judged: int, error_rate: float, seed: int, out: Path | None, keep: bool
) -> None:
    """Show the frozen-set gate alone promoting the wrong candidate on drifted traffic, and a shadow
    judged by reviewers catching it: table, CSV and PNG of the evidence against judged items."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    started = time.perf_counter()
    out = out or Settings().var_dir / "demo-shadow"
    config = ShadowDemoConfig(step=step, max_judged=max_judged, error_rate=error_rate, seed=seed)
    with demo_servers(Settings(), out / "servers") as servers:
        versions, _ = run_shadow_demo(config, servers, out, keep=keep)
    csv_path, png = write_report(versions, config, out)
    for line in [*table(versions), *caught(versions)]:
        click.echo(line)
    click.echo(f"evidence: {csv_path}\nplot: {png}\ntook {time.perf_counter() - started:.0f} s")
