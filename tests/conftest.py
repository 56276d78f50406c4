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

import pytest  # noqa: E402

from models.pipeline import BuildResult, build_digits_model  # noqa: E402


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
    return build_digits_model(split_path=split_path)


@pytest.fixture(scope="session")
def service_env(trained_model: BuildResult, session_home: Path) -> dict[str, str]:
    """Environment that points a service at the session's trained model."""
    return {
        "LOOP_MODEL_NAME": trained_model.stored.name,
        "LOOP_MODEL_TAG": trained_model.stored.version,
        "LOOP_VAR_DIR": str(session_home / "var"),
        "LOOP_DEVICE": "auto",
    }
