"""One round of the loop for the built-in image model, measured: accuracy before and after, and timings.

    python -m experiments.shapes_loop --per-class 100 --traffic-per-class 200

Everything a user would type, in a scratch folder of its own (model store, var folder, a throwaway
database and key prefix on the machine's Postgres and Redis): `loop demo-data shapes`, `loop
datasets import shapes-cnn`, `loop train --model shapes-cnn` (the first model, from the original
data alone), `loop serve`; then PNG uploads of shapes the model has not seen (another seed), a
reviewer who judges every one over HTTP (`correct`, or `wrong` with the drawn class), `loop
datasets compile --model shapes-cnn` and `loop retrain --model shapes-cnn`. Prints the validation
accuracy of both models (on the same frozen validation version) and how long each step took.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg

import harness
from feedback import review as rs
from models import builtin, shapes
from models.spec import ModelSpec

logger = logging.getLogger("shapes_loop")


def _loop(env: dict[str, str], *args: str) -> tuple[str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=harness.ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"loop {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout, time.perf_counter() - started


def _accuracy(output: str) -> float:
    found = re.search(r"validation accuracy ([0-9.]+)", output)
    assert found is not None, output
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100, help="Original images per class.")
    parser.add_argument("--traffic-per-class", type=int, default=200, help="Uploads per class, judged by a reviewer.")
    parser.add_argument("--epochs", type=int, default=None, help="Protocol epochs (default: the protocol's 30).")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = builtin.DEMO_DATA["shapes"].model_name
    spec: ModelSpec | None = builtin.builtin_spec(model)
    assert spec is not None
    work = Path(tempfile.mkdtemp(prefix="shapes-loop-"))
    port = harness.free_port()
    epochs = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    times: dict[str, float] = {}
    try:
        with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
            env = {
                **os.environ,
                "BENTOML_HOME": str(work / "bentoml"),
                "BENTOML_DO_NOT_TRACK": "True",
                "LOOP_VAR_DIR": str(work / "var"),
                "LOOP_DATABASE_URL": database_url,
                "LOOP_REDIS_URL": args.redis,
                "LOOP_REDIS_PREFIX": prefix,
                "LOOP_MODEL_NAME": model,
                "LOOP_PORT": str(port),
                "LOOP_HOST": "127.0.0.1",
                "LOOP_REVIEW_OVERLAP_SHARE": "0",
                "LOOP_INGEST_METRICS_PORT": "0",
            }
            _, times["demo-data"] = _loop(
                env, "demo-data", "shapes", str(work / "shapes"), "--per-class", str(args.per_class)
            )
            _, times["import"] = _loop(env, "datasets", "import", model, str(work / "shapes"))
            first, times["first train"] = _loop(env, "train", "--model", model, *epochs)
            url = f"http://127.0.0.1:{port}"
            command = harness.LOOP_SERVE
            with harness.running(command, env, ready_url=f"{url}/readyz", log=work / "serve.log"):
                truth = _traffic(url, work / "traffic", args.traffic_per_class, model, times)
                with psycopg.connect(database_url, autocommit=True) as conn:
                    _, token = rs.create_user(conn=conn, name="reviewer", role=rs.Role.REVIEWER)
                _review(url, token, truth, times)
            compiled, times["compile"] = _loop(env, "datasets", "compile", "--model", model)
            dataset = re.search(r"training version ([0-9a-f]{32})", compiled)
            assert dataset is not None, compiled
            second, times["retrain"] = _loop(env, "retrain", "--model", model, "--dataset", dataset.group(1), *epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    originals = args.per_class * len(spec.classes)
    print(
        f"\n{model}: {originals} original images ({originals - originals // 5} train, {originals // 5} validation), "
        f"{len(truth)} uploads judged"
    )
    print(f"  first model (original data only):     validation accuracy {_accuracy(first):.4f}")
    print(f"  after one round of corrected traffic: validation accuracy {_accuracy(second):.4f}")
    print("  " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in times.items()))
    print("  " + second.strip().splitlines()[-1])


def _traffic(url: str, folder: Path, per_class: int, model: str, times: dict[str, float]) -> dict[str, str]:
    shapes.write(folder, per_class=per_class, seed=1)
    truth: dict[str, str] = {}
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        for kind in shapes.CLASS_NAMES:
            for path in sorted((folder / kind).iterdir()):
                response = http.post(
                    "/predict", data={"model": model}, files=[("image", (path.name, path.read_bytes(), "image/png"))]
                )
                response.raise_for_status()
                truth[response.json()["predictions"][0]["id"]] = kind
    times["uploads"] = time.perf_counter() - started
    return truth


def _review(url: str, token: str, truth: dict[str, str], times: dict[str, float]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        deadline = time.monotonic() + 60
        while http.get("/review/counts").json()["unmoderated"] < len(truth):  # the ingest worker catches up
            if time.monotonic() > deadline:
                raise SystemExit("the uploads were not all stored within 60 s")
            time.sleep(0.2)
        judged = 0
        while judged < len(truth):
            claimed = http.post("/review/claim", json={"count": 100}).json()
            if not claimed:
                raise SystemExit(f"the queue ran dry after {judged} of {len(truth)} items")
            verdicts = [
                {"prediction_id": c["id"], "verdict": "correct"}
                if c["label"] == truth[c["id"]]
                else {"prediction_id": c["id"], "verdict": "wrong", "label": truth[c["id"]]}
                for c in claimed
            ]
            http.post("/review/verdicts", json={"verdicts": verdicts}).raise_for_status()
            judged += len(claimed)
    times["review"] = time.perf_counter() - started


if __name__ == "__main__":
    main()
