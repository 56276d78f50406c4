"""The process supervisor behind `loop serve`: Postgres and Redis (embedded unless configured),
the migrations, then the BentoML service, the shared inference processes and the ingest worker as
children. A child that dies is started again after a back-off, as an orchestrator would; Ctrl-C or
SIGTERM stops them in an order that loses nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.settings import Settings

logger = logging.getLogger("loop")

ROOT = Path(__file__).resolve().parent.parent
RESTARTS_PER_MINUTE = 5  # a child that dies more often than this is broken, not unlucky


def prepare(
    settings: Settings, stack: contextlib.ExitStack, *, ingest: bool
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Start the servers `loop serve` owns (stopped when `stack` closes), apply the migrations, and
    return each child's command and the environment they share."""
    env = dict(os.environ)
    if settings.log_predictions:
        env["LOOP_DATABASE_URL"] = settings.database_url or _embedded_postgres(settings, stack)
        env["LOOP_REDIS_URL"] = settings.redis_url or _embedded_redis(settings, stack)
    commands = _children(settings, env, ingest=ingest)
    if settings.log_predictions:
        # Migrations run before the children start, so neither races the other over them.
        subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, check=True)
    env["BENTOML_CONFIG_OPTIONS"] = " ".join(
        filter(None, [env.get("BENTOML_CONFIG_OPTIONS", ""), f"services.loop.workers={settings.workers}"])
    )
    return commands, env


def _children(settings: Settings, env: dict[str, str], *, ingest: bool) -> dict[str, list[str]]:
    """The command of each child by name: the service, one inference process per GPU pin (when
    inference is shared; their count goes into `env`), the ingest worker."""
    from models.runtime import cuda_devices
    from service.inference import gpu_pins

    bentoml = str(Path(sys.executable).with_name("bentoml"))
    children = {
        "service": [
            bentoml,
            "serve",
            "service.app:Predictor",
            "--working-dir",
            str(ROOT),
            "--host",
            settings.host,
            "--port",
            str(settings.port),
        ],
    }
    if settings.shared_inference:
        pins = gpu_pins(settings.inference_processes, cuda_devices()[0], env.get("CUDA_VISIBLE_DEVICES"))
        env["LOOP_INFERENCE_PROCESSES"] = str(len(pins))
        for i, gpu in enumerate(pins):
            pin = [] if gpu is None else ["--gpu", gpu]
            children[f"inference-{i}"] = [sys.executable, "-m", "service", "inference", "--index", str(i), *pin]
    if settings.log_predictions and ingest:
        children["ingest"] = [sys.executable, "-m", "service", "ingest"]
    return children


def _embedded_postgres(settings: Settings, stack: contextlib.ExitStack) -> str:
    from service.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.var_dir / "postgres", settings.embedded_postgres_port)
    url = server.start()
    stack.callback(server.stop)
    return url


def _embedded_redis(settings: Settings, stack: contextlib.ExitStack) -> str:
    from service.embedded import EmbeddedRedis

    server = EmbeddedRedis(settings.var_dir / "redis", settings.embedded_redis_port)
    url = server.start()
    stack.callback(server.stop)
    return url


def _death_signal() -> Callable[[], None] | None:
    """A function for a child to run before exec: get SIGTERM when `loop serve` dies, however it
    dies, so the service and ingest worker are never orphaned (Linux only). libc is resolved here,
    in the parent, so that the child does no more than one system call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def supervise(commands: dict[str, list[str]], env: dict[str, str]) -> int:
    """Run the children until Ctrl-C or SIGTERM. A child that dies is started again after a
    back-off (1 s, doubling to 30 s), as an orchestrator would; one that dies more than
    `RESTARTS_PER_MINUTE` times in a minute stops everything. Returns the exit status."""
    return _Supervisor(commands, env).run()


class _Supervisor:
    def __init__(self, commands: dict[str, list[str]], env: dict[str, str]) -> None:
        self.commands = commands
        self.env = env
        self.die_with_parent = _death_signal()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.deaths: dict[str, list[float]] = {name: [] for name in commands}
        self.due: dict[str, float] = {}  # when a dead child is started again
        self.stopping = False
        self.code = 0

    def launch(self, name: str) -> subprocess.Popen[bytes]:
        # preexec_fn runs one prctl call, resolved before the fork (see _death_signal).
        return subprocess.Popen(
            self.commands[name],
            env=self.env,
            start_new_session=True,
            preexec_fn=self.die_with_parent,  # noqa: PLW1509
        )

    def run(self) -> int:
        self.processes = {name: self.launch(name) for name in self.commands}
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                self.note_deaths(time.monotonic())
                self.restart_due()
                time.sleep(0.2)
        finally:
            logger.info("stopping")
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.code

    def request_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def note_deaths(self, now: float) -> None:
        """Give each child that died since the last look its restart time, or stop everything if
        it dies too often."""
        for name, process in self.processes.items():
            if name in self.due or process.poll() is None:
                continue
            recent = [t for t in self.deaths[name] if now - t < 60] + [now]
            self.deaths[name] = recent
            if len(recent) > RESTARTS_PER_MINUTE:
                logger.error(
                    "%s exited %d times in a minute (last code %s); stopping", name, len(recent), process.returncode
                )
                self.code, self.stopping = process.returncode or 1, True
                return
            wait = min(30.0, 2.0 ** (len(recent) - 1))
            logger.error("%s exited with code %s; starting it again in %.0f s", name, process.returncode, wait)
            self.due[name] = now + wait

    def restart_due(self) -> None:
        for name, when in list(self.due.items()):
            if not self.stopping and time.monotonic() >= when:
                self.processes[name] = self.launch(name)
                del self.due[name]
                logger.info("%s started again (pid %d)", name, self.processes[name].pid)

    def stop(self) -> None:
        # The service first (no new predictions), then the models it ran, then the ingest worker
        # (it drains what it holds).
        for name in ["service", *sorted(n for n in self.processes if n.startswith("inference")), "ingest"]:
            child = self.processes.get(name)
            if child is None or child.poll() is not None:
                continue
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in 30 s; killing it", name)
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
