"""Inference on an existing engine (`LOOP_INFERENCE=remote`): a model version's session is the same
graph served by an Open Inference Protocol server, over HTTP or gRPC with Triton's own client.

The service still parses, checks, pre-processes, logs and reviews; each batch goes to the engine as
the graph's input tensor, named with the version's number (`models.store.version_number`, as
`loop models export-triton` numbers it), and its output comes back to be scored as the service scores
its own. So a promotion is followed remotely by the next call naming the new number. With a
repository set (`LOOP_INFERENCE_REPOSITORY`, a folder the engine reads too), the service writes each
version it is about to serve there and asks the engine to load it (the model repository extension);
otherwise the team exports the versions the service may serve.

Any failure to reach the engine, or its refusal of a call, is `InferenceUnavailable` (a 503): the
engine is a dependency, and the service answers as it does when Redis is down.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from numpy.typing import NDArray

from models import store
from service.inference import InferenceUnavailable

logger = logging.getLogger(__name__)

PROTOCOLS = ("http", "https", "grpc")
READY_POLL_S = 0.25


@dataclass(frozen=True)
class Engine:
    """Where the sessions run: an Open Inference Protocol endpoint."""

    url: str  # http://host:port, https://host:port or grpc://host:port
    timeout_s: float = 30.0
    repository: Path | None = None  # set: the service exports each version there and asks the engine to load it

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in PROTOCOLS or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"an inference URL is http(s)://host:port or grpc://host:port, got {self.url!r}")

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def address(self) -> str:
        """host:port, as Triton's clients take it."""
        return urlsplit(self.url).netloc

    def client(self) -> Any:
        """A new client of this engine (tritonclient's HTTP or gRPC one)."""
        if self.protocol == "grpc":
            import tritonclient.grpc as grpcclient

            return grpcclient.InferenceServerClient(self.address)
        import tritonclient.http as httpclient

        timeout = self.timeout_s
        return httpclient.InferenceServerClient(
            self.address, ssl=self.protocol == "https", connection_timeout=timeout, network_timeout=timeout
        )


def _errors() -> tuple[type[BaseException], ...]:
    from tritonclient.utils import InferenceServerException

    return (InferenceServerException, OSError)


class EngineSession:
    """A `models.runtime.Session` whose calls the engine runs: version `number` of model `name`.

    The HTTP client is bound to the thread that made it (gevent), so each thread calling `run` has
    its own; a client whose call failed is dropped and made again by the next call, so an engine that
    comes back is found again without restarting the service.
    """

    exact_math = False  # the engine decides its own math; the stored reference still gates the version

    def __init__(self, engine: Engine, stored: store.StoredModel) -> None:
        self.engine = engine
        self.stored = stored
        self.number = str(store.version_number(stored))
        spec = stored.card.model_spec
        self.input_name, self.output_name = spec.onnx_input, spec.onnx_output
        self.provider = f"remote:{engine.url}"
        self.providers = [self.provider]
        self.fallback_reason: str | None = None
        self._local = threading.local()
        self._clients: list[Any] = []  # every thread's, closed together
        self._lock = threading.Lock()
        self._open()

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        array = np.ascontiguousarray(batch, dtype=np.float32)
        module = self._module()
        given = module.InferInput(self.input_name, list(array.shape), "FP32")
        given.set_data_from_numpy(array)  # HTTP sends and asks for binary tensors by default
        wanted = [module.InferRequestedOutput(self.output_name)]
        # The HTTP client's timeouts are its own (`Engine.client`); a gRPC call takes one per call.
        call: dict[str, Any] = {"client_timeout": self.engine.timeout_s} if self.engine.protocol == "grpc" else {}
        try:
            result = self._client().infer(self.stored.name, [given], model_version=self.number, outputs=wanted, **call)
            outputs = result.as_numpy(self.output_name)
        except _errors() as exc:
            self._drop()
            raise InferenceUnavailable(f"the inference engine at {self.engine.url} failed a call: {exc}") from exc
        if outputs is None or len(outputs) != len(array):
            raise InferenceUnavailable(
                f"the inference engine at {self.engine.url} answered {self.output_name!r} for "
                f"{None if outputs is None else len(outputs)} samples of {len(array)}"
            )
        return np.asarray(outputs, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            _close(client)

    def _open(self) -> None:
        """Export and load the version when a repository is set, then wait until the engine serves
        it with the graph's input and output."""
        name, engine = self.stored.name, self.engine
        try:
            client = self._client()
            if engine.repository is not None:
                self._export_and_load(client)
            deadline = time.monotonic() + engine.timeout_s
            while not client.is_model_ready(name, self.number):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the inference engine at {engine.url} does not serve {name} version {self.number} "
                        f"({self.stored.tag}); write it into the engine's repository with `loop models "
                        f"export-triton {name} DIR --version {self.stored.version}`"
                    )
                time.sleep(READY_POLL_S)
            metadata = client.get_model_metadata(name, self.number, **self._as_json())
        except _errors() as exc:
            self._drop()
            raise InferenceUnavailable(f"the inference engine at {engine.url} is not reachable: {exc}") from exc
        inputs = [t["name"] for t in metadata.get("inputs", [])]
        outputs = [t["name"] for t in metadata.get("outputs", [])]
        if self.input_name not in inputs or self.output_name not in outputs:
            raise RuntimeError(
                f"{name} version {self.number} at {engine.url} takes {inputs} and answers {outputs}; "
                f"{self.stored.tag}'s graph takes {self.input_name!r} and answers {self.output_name!r}"
            )
        logger.info("%s runs at %s as %s version %s", self.stored.tag, engine.url, name, self.number)

    def _export_and_load(self, client: Any) -> None:
        from models.triton import export_repository  # onnx, only when a repository is written

        assert self.engine.repository is not None
        if not (self.engine.repository / self.stored.name / self.number / "model.onnx").exists():
            export_repository(self.stored, self.engine.repository, number=int(self.number))
            logger.info("wrote %s into %s as version %s", self.stored.tag, self.engine.repository, self.number)
        from tritonclient.utils import InferenceServerException

        try:
            client.load_model(self.stored.name)
        except InferenceServerException as exc:  # an engine that polls its repository refuses explicit loads
            logger.warning(
                "the engine did not take a load of %s (%s); waiting for it to find it", self.stored.name, exc
            )

    def _as_json(self) -> dict[str, Any]:
        return {"as_json": True} if self.engine.protocol == "grpc" else {}

    def _module(self) -> Any:
        if self.engine.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.engine.client()
            with self._lock:
                self._clients.append(client)
        return client

    def _drop(self) -> None:
        """Forget this thread's client (after a failed call)."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            _close(client)


def _close(client: Any) -> None:
    try:
        client.close()
    except Exception:  # a broken client may fail to close; it is dropped either way
        logger.debug("closing an inference client failed", exc_info=True)
