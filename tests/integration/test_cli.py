"""The `loop` command line against a real database."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis

from feedback import review as review_store
from feedback.keys import Keys
from models.pipeline import BuildResult
from tests.conftest import REDIS

pytestmark = pytest.mark.integration


def loop(*args: str, database_url: str, **env_: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOOP_DATABASE_URL": database_url, **env_}
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, timeout=180, check=False
    )


def test_users_add_prints_a_working_token_once(database_url: str) -> None:
    created = loop("users", "add", "alice", "--role", "admin", database_url=database_url)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert len(token) >= 40
    with psycopg.connect(database_url) as conn:
        user = review_store.authenticate(conn=conn, token=token)
        stored = conn.execute("SELECT token_hash FROM users WHERE name = 'alice'").fetchone()
    assert user is not None and user.role is review_store.Role.ADMIN
    assert stored is not None and token.encode() not in bytes(stored[0])  # only the hash is kept
    again = loop("users", "add", "alice", database_url=database_url)
    assert again.returncode != 0 and "exists" in again.stderr
    listed = loop("users", "list", database_url=database_url)
    assert "alice\tadmin" in listed.stdout


def test_migrate_is_idempotent(database_url: str) -> None:
    result = loop("migrate", database_url=database_url)
    assert result.returncode == 0 and "up to date" in result.stdout


def test_compile_retrain_and_report_from_the_command_line(database_url: str, keys: Keys, tmp_path: Path) -> None:
    env = {
        "LOOP_VAR_DIR": str(tmp_path / "var"),
        "LOOP_REDIS_URL": REDIS,
        "LOOP_REDIS_PREFIX": keys.prefix,
        "LOOP_MODEL_NAME": f"cli-{keys.prefix}",
    }
    wrong_model = loop("datasets", "compile", database_url=database_url, **env)
    assert wrong_model.returncode == 1 and "no built-in one (import it: `loop models import`)" in wrong_model.stderr

    # The default model, in a model store of this test's own (retraining adds versions to it).
    env["LOOP_MODEL_NAME"] = "digits-cnn"
    env["BENTOML_HOME"] = str(tmp_path / "bentoml")
    assert loop("users", "add", "root", "--role", "admin", database_url=database_url).returncode == 0
    assert "'nobody' is not an admin" in loop("datasets", "compile", "--admin", "nobody", database_url=database_url,
                                             **env).stderr  # fmt: skip
    compiled = loop("datasets", "compile", "--admin", "root", database_url=database_url, **env)
    assert compiled.returncode == 0, compiled.stderr
    version = re.search(r"training version ([0-9a-f]{32}): 1437 rows", compiled.stdout)
    assert version is not None, compiled.stdout
    assert "compiling" in compiled.stderr  # the progress bar

    missing = loop("retrain", "--dataset", "0" * 32, database_url=database_url, **env)
    assert missing.returncode == 1 and "no dataset version" in missing.stderr
    trained = loop("retrain", "--dataset", version.group(1), "--epochs", "2", "--margin", "0.05",
                   database_url=database_url, **env)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "promoted: no champion yet" in trained.stdout  # an empty store: nothing to beat
    champion = loop("champion", database_url=database_url, **env)
    assert "promoted" in champion.stdout and "no champion yet" in champion.stdout
    assert "margin 0.0500" in champion.stdout  # the gate's margin, as recorded
    bad_fix = loop("validation", "fix", "--item", "nonsense", "--reason", "r", "--admin", "root",
                   database_url=database_url, **env)  # fmt: skip
    assert bad_fix.returncode == 2 and "ITEM=LABEL" in bad_fix.stderr
    report = loop("experiments", "--out", str(tmp_path / "report"), database_url=database_url, **env)
    assert report.returncode == 0, report.stderr
    assert version.group(1)[:12] in report.stdout
    assert (tmp_path / "report" / "validation_error.png").read_bytes().startswith(b"\x89PNG")


def test_original_data_is_imported_once_refused_clearly_and_verified(database_url: str, tmp_path: Path) -> None:
    env = {"LOOP_VAR_DIR": str(tmp_path / "var")}
    data = tmp_path / "shapes"
    written = loop("demo-data", "shapes", str(data), "--per-class", "6", database_url=database_url, **env)
    assert written.returncode == 0 and "wrote 30 images" in written.stdout, written.stderr
    again = loop("demo-data", "shapes", str(data), database_url=database_url, **env)
    assert again.returncode == 1 and "is not empty" in again.stderr

    (data / "hexagon").mkdir()
    refused = loop("datasets", "import", "shapes-cnn", str(data), database_url=database_url, **env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "no class of the model is called 'hexagon'" in refused.stderr
    (data / "hexagon").rmdir()
    unknown = loop("datasets", "import", "no-such-model", str(data), database_url=database_url, **env)
    assert unknown.returncode == 1 and "no model 'no-such-model' in the store" in unknown.stderr

    imported = loop("datasets", "import", "shapes-cnn", str(data), database_url=database_url, **env)
    assert imported.returncode == 0, imported.stderr
    validation = re.search(r"validation ([0-9a-f]{32}): 6 rows \(frozen\)", imported.stdout)
    assert validation is not None, imported.stdout
    twice = loop("datasets", "import", "shapes-cnn", str(data), database_url=database_url, **env)
    assert twice.returncode == 1 and "imported once" in twice.stderr
    listed = loop("datasets", "list", "--model", "shapes-cnn", database_url=database_url, **env).stdout
    assert [line.split()[1] for line in listed.splitlines()] == ["original", "validation"]

    verified = loop("datasets", "verify", validation.group(1), database_url=database_url, **env)
    assert verified.returncode == 0 and "hash to its id" in verified.stdout
    image = next((tmp_path / "var" / "datasets" / validation.group(1) / "images").rglob("*.png"))
    image.chmod(0o644)
    image.write_bytes(image.read_bytes() + b"\0")
    tampered = loop("datasets", "verify", validation.group(1), database_url=database_url, **env)
    assert tampered.returncode == 1 and "its files were changed" in tampered.stderr


def test_a_shadow_is_started_shown_and_stopped_and_announced(
    database_url: str, keys: Keys, trained_model: BuildResult
) -> None:
    env = {"LOOP_REDIS_URL": REDIS, "LOOP_REDIS_PREFIX": keys.prefix, "LOOP_MODEL_NAME": trained_model.stored.name}
    tag = str(trained_model.stored.tag)
    assert loop("users", "add", "root", "--role", "admin", database_url=database_url).returncode == 0
    assert "has had no shadow" in loop("shadow", "status", database_url=database_url, **env).stdout
    for args, error in [
        ((tag, "--admin", "nobody"), "'nobody' is not an admin"),
        ((tag, "--share", "0", "--admin", "root"), "0<x<=1"),
        ((f"{trained_model.stored.name}:v-none", "--admin", "root"), "v-none"),
    ]:
        refused = loop("shadow", "start", *args, database_url=database_url, **env)
        assert refused.returncode != 0 and error in refused.stderr, (args, refused.stderr)
    started = loop("shadow", "start", tag, "--share", "0.5", "--admin", "root", database_url=database_url, **env)
    assert started.returncode == 0 and "share 0.5" in started.stdout, started.stderr
    with redis.Redis.from_url(REDIS) as client:
        announced = json.loads(client.get(keys.shadow(trained_model.stored.name)) or b"{}")
    assert announced == {"model_name": trained_model.stored.name, "model_version": trained_model.stored.version,
                         "share": 0.5}  # fmt: skip
    twice = loop("shadow", "start", tag, "--admin", "root", database_url=database_url, **env)
    assert twice.returncode == 1 and "stop it first" in twice.stderr
    assert loop("shadow", "status", database_url=database_url, **env).stdout.startswith(f"* {tag}")
    stopped = loop("shadow", "stop", trained_model.stored.name, "--reason", "done", "--admin", "root",
                   database_url=database_url, **env)  # fmt: skip
    assert stopped.returncode == 0 and "stopped" in stopped.stdout and ": done" in stopped.stdout, stopped.stderr
    with redis.Redis.from_url(REDIS) as client:
        assert json.loads(client.get(keys.shadow(trained_model.stored.name)) or b"{}") == {
            "model_name": trained_model.stored.name}  # fmt: skip
    assert loop("shadow", "status", database_url=database_url, **env).stdout.startswith(f"  {tag}")
