"""Label Studio, for the tests and for trying the bridge by hand: installed once into an environment
of its own under `var/tools/label-studio` (`make label-studio`, or `python -m harness.label_studio`),
about 1 GB, since its dependencies (Django and many more) must not meet the service's.

`running` starts it on SQLite in a throwaway folder with a known user and API token (the legacy
token, which its API takes only with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true), and stops it.
`sdk` runs `harness/label_studio_steps.py` under its Python: the steps a team takes with Label
Studio's own SDK, each answering JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import processes

logger = logging.getLogger(__name__)

VERSION = "1.23.2"
ROOT = Path(__file__).resolve().parents[1] / "var" / "tools" / "label-studio"
SDK_SCRIPT = Path(__file__).with_name("label_studio_steps.py")
START_TIMEOUT_S = 240.0  # its first start migrates its SQLite database: about a minute here


class NotInstalled(RuntimeError):
    """Label Studio is not under `ROOT`: `make label-studio` installs it."""


def _python(root: Path) -> Path:
    return root / "bin" / "python"


def _stamp(root: Path) -> Path:
    return root / f".installed-{VERSION}"


def python(root: Path = ROOT) -> Path:
    """Label Studio's own Python, or `NotInstalled`."""
    if not _stamp(root).exists():
        raise NotInstalled(f"Label Studio {VERSION} is not installed under {root}: run `make label-studio`")
    return _python(root)


def install(root: Path = ROOT) -> Path:
    """Create its environment and install it, unless that was done; its Python."""
    if not _stamp(root).exists():
        logger.info("installing label-studio %s into %s (about 1 GB, a few minutes)", VERSION, root)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        pip = [str(_python(root)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, f"label-studio=={VERSION}"], check=True)
        _stamp(root).touch()
    return python(root)


@dataclass(frozen=True)
class LabelStudio:
    url: str
    token: str
    log: Path

    def sdk(self, step: str, **arguments: Any) -> Any:
        """One step of `label_studio_steps.py` with the SDK against this Label Studio; its JSON answer."""
        command = [str(python()), str(SDK_SCRIPT), self.url, self.token, step, json.dumps(arguments)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"label_studio_steps.py {step} failed: {done.stderr[-4000:]}")
        return json.loads(done.stdout)


@contextlib.contextmanager
def running(folder: Path, *, email: str = "admin@example.com", token: str = "loop-test-token") -> Iterator[LabelStudio]:
    """Label Studio on a free port with its data in `folder`, stopped however the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    port = processes.free_port()
    env = {
        "LABEL_STUDIO_BASE_DATA_DIR": str(folder),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "SSRF_PROTECTION_ENABLED": "false",  # the service it calls runs on this host too
        "ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "false",
        "DJANGO_DB": "sqlite",
        "COLLECT_ANALYTICS": "false",
    }
    binary = python().parent / "label-studio"
    command = [str(binary), "start", "--no-browser", "--port", str(port), "--host", f"http://127.0.0.1:{port}"]
    command += ["--username", email, "--password", "loop-test-password", "--user-token", token]
    log = folder / "label-studio.log"
    ready = f"http://127.0.0.1:{port}/health"
    with processes.running(command, env, ready_url=ready, log=log, start_timeout_s=START_TIMEOUT_S, stop_timeout_s=30):
        yield LabelStudio(url=f"http://127.0.0.1:{port}", token=token, log=log)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("Label Studio ready: %s", install())
