"""Shared fixtures. The BentoML store of a test session lives in a temporary folder of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Must happen before anything imports bentoml: the store location is read once.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="loop-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_HOME / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "True"

from contextlib import contextmanager  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402

from feedback.keys import Keys  # noqa: E402
from feedback.migrate import migrate  # noqa: E402
from harness import key_prefix, throwaway_database  # noqa: E402
from models.pipeline import BuildResult, build_bundled_model  # noqa: E402

# The machine's shared servers. Every test gets its own database and its own key prefix on them.
POSTGRES = os.environ.get("LOOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("LOOP_TEST_REDIS", "redis://127.0.0.1:6379/0")


@contextmanager
def fresh_database(server: str = POSTGRES) -> Iterator[str]:
    """A new, migrated database on `server`; dropped afterwards."""
    with throwaway_database(server, kind="test") as url:
        with psycopg.connect(url) as conn:
            migrate(conn)
        yield url


@contextmanager
def redis_namespace(url: str = REDIS) -> Iterator[Keys]:
    """A key prefix no other test uses; its keys are deleted afterwards."""
    with key_prefix(url, kind="test") as prefix:
        yield Keys(prefix)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder other users can traverse, for an embedded Postgres that runs as its own system user
    when the tests run as root. pytest keeps its own tmp root at mode 0700 and resets it whenever
    another pytest session starts, so such data cannot live under `tmp_path`."""
    folder = Path(tempfile.mkdtemp(prefix="loop-test-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def database_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
def keys() -> Iterator[Keys]:
    with redis_namespace() as k:
        yield k


@pytest.fixture(scope="session")
def session_home() -> Iterator[Path]:
    yield _SESSION_HOME
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def split_path(session_home: Path) -> Path:
    return session_home / "var" / "validation" / "digits-cnn-split.json"


@pytest.fixture(scope="session")
def trained_model(split_path: Path) -> BuildResult:
    """The default digits model, trained once per test session with the default protocol."""
    return build_bundled_model(split_path=split_path)


@pytest.fixture(scope="session")
def model_env(trained_model: BuildResult) -> dict[str, str]:
    """Environment that points a service at the session's trained model."""
    return {
        "LOOP_MODEL_NAME": trained_model.stored.name,
        "LOOP_MODEL_TAG": trained_model.stored.version,
        "LOOP_DEVICE": "auto",
        "LOOP_INGEST_METRICS_PORT": "0",
    }


@pytest.fixture
def service_env(model_env: dict[str, str], database_url: str, keys: Keys, tmp_path: Path) -> dict[str, str]:
    """A service on the machine's servers with a database, key prefix and var folder of its own."""
    return {
        **model_env,
        "LOOP_DATABASE_URL": database_url,
        "LOOP_REDIS_URL": REDIS,
        "LOOP_REDIS_PREFIX": keys.prefix,
        "LOOP_VAR_DIR": str(tmp_path / "var"),
    }
