"""The API contract, fuzzed: schemathesis runs every operation of the service's own OpenAPI
schema, with every check, as a reviewer and as an admin, and finds nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from feedback import review as review_store
from tests.integration.conftest import ROOT, RunningService

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 25  # per operation and phase: about 2,500 requests a role
SEED = 1


def schemathesis(url: str, token: str, report: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(Path(sys.executable).with_name("st")), "--config-file", str(CONFIG), "run", f"{url}/docs.json",
        "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--no-color",
        "--header", f"Authorization: Bearer {token}", "--report", "junit", "--report-dir", str(report),
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_schemathesis_finds_no_failure_as_reviewer_or_admin(
    start_service: Callable[..., RunningService], database_url: str, tmp_path: Path
) -> None:
    service = start_service()
    operations = sum(
        method in ("get", "post", "put", "patch", "delete")
        for item in httpx.get(f"{service.url}/docs.json", timeout=10).json()["paths"].values()
        for method in item
    )
    assert operations >= 40  # the whole API is in the schema: predict, v2, review, admin
    with psycopg.connect(database_url, autocommit=True) as conn:
        tokens = {
            role.value: review_store.create_user(conn=conn, name=f"fuzz-{role.value}", role=role)[1]
            for role in (review_store.Role.REVIEWER, review_store.Role.ADMIN)
        }
    for role, token in tokens.items():
        run = schemathesis(service.url, token, tmp_path / role)
        output = run.stdout + run.stderr
        assert run.returncode == 0, f"schemathesis as {role}:\n{output[-6000:]}"
        tested = re.search(r"Tested: (\d+)", output)
        assert tested is not None and int(tested.group(1)) == operations, output[-2000:]
        assert re.search(r"(\d+) generated, \1 passed", output), output[-2000:]
    assert "Traceback" not in service.logs()  # no request made the service fail inside
