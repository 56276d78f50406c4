"""A headless locust run that stops by itself, then checks that every prediction answered is stored.

    python -m loadtest.run_locust --host http://127.0.0.1:3000 --users 20 --spawn-rate 5 --run-time 30s \
        --reviewer-token=TOKEN --admin-token=TOKEN
    python -m loadtest.run_locust --host http://a:3000 --replicas http://a:3000,http://b:3000 ...

Writes locust's CSV files and HTML report under `--out` (default var/locust/<time>/), then asks
`GET /predictions/{id}` for every id received until each is in Postgres (`ingested`), and exits
non-zero if locust saw failures or an answered prediction never arrived.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

logger = logging.getLogger("run_locust")
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def unstored(host: str, ids: list[str], timeout_s: float) -> list[str]:
    """The ids not (yet) in Postgres once `timeout_s` has passed."""
    waiting = list(ids)
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=host, timeout=10) as client, ThreadPoolExecutor(8) as pool:

        def ingested(prediction_id: str) -> bool:
            response = client.get(f"/predictions/{prediction_id}")
            return response.status_code == 200 and bool(response.json()["ingested"])

        while waiting and time.monotonic() < deadline:
            done = list(pool.map(ingested, waiting))
            waiting = [i for i, ok in zip(waiting, done, strict=True) if not ok]
            if waiting:
                time.sleep(0.5)
    return waiting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="http://127.0.0.1:3000")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=5)
    parser.add_argument("--run-time", default="30s")
    parser.add_argument("--reviewer-token", default="")
    parser.add_argument("--admin-token", default="")
    parser.add_argument(
        "--replicas", default="", help="The service's replicas, comma separated (users spread over them)."
    )
    parser.add_argument("--predict-weight", type=int, default=10)
    parser.add_argument("--review-weight", type=int, default=2)
    parser.add_argument("--admin-weight", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--store-timeout", type=float, default=60, help="Seconds to wait for ingestion.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = args.out or Path("var/locust") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    ids_file = out / "ids.txt"
    ids_file.write_text("")
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        # `=` keeps a token that starts with "-" from reading as an option.
        f"--reviewer-token={args.reviewer_token}",
        f"--admin-token={args.admin_token}",
        f"--replicas={args.replicas}",
        "--predict-weight",
        str(args.predict_weight),
        "--review-weight",
        str(args.review_weight),
        "--admin-weight",
        str(args.admin_weight),
        "--ids-file",
        str(ids_file),
    ]
    locust = subprocess.run(command, check=False)
    ids = [line for line in ids_file.read_text().splitlines() if line]
    missing = unstored(args.host, ids, args.store_timeout)
    logger.info(
        "locust exit code %d; %d predictions answered; %d not stored", locust.returncode, len(ids), len(missing)
    )
    logger.info("CSV and HTML report in %s", out)
    if missing:
        logger.error("not stored: %s", ", ".join(missing[:10]))
    sys.exit(1 if locust.returncode or missing or not ids else 0)


if __name__ == "__main__":
    main()
