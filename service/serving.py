"""One served model: where its version comes from, the loaded ONNX Runtime session, its batcher.

The service holds one `ModelSlot` per model it serves. Each resolves its own store reference (its
champion, from Postgres, else Redis, else the newest; or a pinned version), loads beside the
server so `/livez` answers at once, swaps to a new champion between batches, and batches its own
requests: two models never share a batch or wait for each other.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import redis
from numpy.typing import NDArray

from feedback.champion import champion as current_champion
from feedback.keys import Keys
from models import store
from models.runtime import CPU, DevicePreference, OnnxModel, ReferenceCheck, Session, check_reference
from service import database, metrics
from service.batching import AdaptiveBatcher
from service.inference import InferenceUnavailable, RemoteSession
from service.remote import Engine, EngineSession
from service.settings import CHAMPION

logger = logging.getLogger(__name__)

INFERENCE_WAIT_S = 60.0  # how long a worker waits for the shared inference process to come up
SHADOW_NICENESS = 10  # a shadow's inference thread yields the CPU to the answers' (its work may wait)


@dataclass(frozen=True)
class Served:
    """A loaded model: what the store says about it and the session that runs it."""

    stored: store.StoredModel
    runtime: Session
    reference: ReferenceCheck | None = None  # None: the model was stored without a reference


@dataclass(frozen=True)
class Where:
    """How a slot finds its versions and runs them."""

    database_url: str | None
    redis_url: str | None
    keys: Keys
    device: DevicePreference
    ort_threads: int
    max_batch_size: int
    max_latency_s: float
    reference_tolerance: float = 1e-3
    exact_math_fallback: bool = True  # above tolerance, load again with the provider's exact math
    inference_socket: Path | None = None  # set: the sessions run in the shared inference process
    engine: Engine | None = None  # set: the sessions run on an Open Inference Protocol engine


class ReferenceMismatch(RuntimeError):
    """The model's outputs on the serving provider differ from its stored reference beyond tolerance."""


class ModelSlot:
    """A model the service serves, by name: `tag` is 'champion', 'latest' or a pinned version.
    `serves` False: a shadow's slot, which answers no one, so it is not reported as a served
    version nor counted in the served model's batch metrics (it has its own counters)."""

    def __init__(self, name: str, tag: str, where: Where, *, serves: bool = True) -> None:
        self.name = name
        self.tag = tag
        self.where = where
        self.serves = serves
        self.served: Served | None = None
        self.load_error: str | None = None
        self.loaded = threading.Event()
        self._swap_lock = threading.Lock()
        self._batcher: AdaptiveBatcher[Served] | None = None
        self._retired: Session | None = None  # the session served before the current one

    @property
    def follows_champion(self) -> bool:
        return self.tag == CHAMPION

    @property
    def fallback_ref(self) -> str:
        """What to load when no champion is known: the newest, or the pinned version."""
        return f"{self.name}:{'latest' if self.tag in (CHAMPION, 'latest') else self.tag}"

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name=f"load-{self.name}", daemon=True).start()

    def _load(self) -> None:
        ref = self.resolve()
        try:
            deadline = time.monotonic() + INFERENCE_WAIT_S
            while True:
                try:
                    self.swap(ref)
                    break
                except InferenceUnavailable as exc:  # it is starting beside the workers
                    if time.monotonic() > deadline:
                        raise
                    logger.info("%s waits for its inference process or engine: %s", ref, exc)
                    time.sleep(1.0)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("could not load model %s", ref)
        finally:
            self.loaded.set()

    def resolve(self) -> str:
        """The store reference to serve: the champion (Postgres, else Redis) when following it."""
        if not self.follows_champion:
            return self.fallback_ref
        version = None
        if self.where.database_url is not None:
            try:
                with database.connect(self.where.database_url, connect_timeout_s=3) as conn:
                    found = current_champion(conn=conn, model_name=self.name)
                version = found.model_version if found is not None else None
            except psycopg.Error as exc:
                logger.warning("champion of %s not read from Postgres: %s", self.name, exc)
        if version is None and self.where.redis_url is not None:
            try:
                client = redis.Redis.from_url(self.where.redis_url, socket_connect_timeout=2, socket_timeout=2)
                with client:
                    raw = client.get(self.where.keys.champion(self.name))
                version = raw.decode() if isinstance(raw, bytes) else None
            except redis.RedisError as exc:
                logger.warning("champion of %s not read from Redis: %s", self.name, exc)
        return f"{self.name}:{version}" if version else self.fallback_ref

    def swap(self, ref: str) -> bool:
        """Load `ref` and serve it from the next batch on; batches in flight finish on the old session."""
        with self._swap_lock:
            current = self.served
            stored = store.get(ref)
            if current is not None and current.stored.version == stored.version:
                return False
            runtime, reference = self._load_checked(stored)
            self.served = Served(stored=stored, runtime=runtime, reference=reference)
            self.load_error = None
            # The session before `current` is surely idle now (a batch takes milliseconds, a
            # promotion minutes); `current`'s may still finish a batch, so it is kept one swap longer.
            if self._retired is not None:
                self._retired.close()
            self._retired = None if current is None else current.runtime
        for served, value in ((current, 0), (self.served, 1)):
            if served is not None and self.serves:
                info = {"model_name": served.stored.name, "model_version": served.stored.version}
                metrics.model_info.labels(**info, provider=served.runtime.provider).set(value)
        if current is None:
            logger.info("%s %s on %s", "serving" if self.serves else "shadowing with", stored.tag, runtime.provider)
        else:
            logger.info("swapped %s for %s on %s", current.stored.tag, stored.tag, runtime.provider)
        return True

    def _open(self, stored: store.StoredModel, *, exact_math: bool = False) -> Session:
        where, path = self.where, stored.onnx_path
        if where.engine is not None:
            return EngineSession(where.engine, stored)
        if where.inference_socket is not None:
            return RemoteSession(where.inference_socket, path, exact_math=exact_math)
        return OnnxModel(path, device=where.device, intra_op_threads=where.ort_threads, exact_math=exact_math)

    def _load_checked(self, stored: store.StoredModel) -> tuple[Session, ReferenceCheck | None]:
        """A session for `stored` whose outputs match its stored reference on this provider: with
        the provider's exact math when the default math is beyond tolerance (if allowed), else
        `ReferenceMismatch`, so that a model is never served with answers it was not validated for."""
        where = self.where
        runtime = self._open(stored)
        if stored.reference_path is None:
            logger.warning(
                "%s has no stored reference; its outputs on %s are not checked", stored.tag, runtime.provider
            )
            return runtime, None
        kind = stored.card.model_spec.output_kind
        check = check_reference(runtime, stored.reference_path, where.reference_tolerance, kind=kind)
        exact_math_known = runtime.provider != CPU and where.engine is None  # an engine keeps its own math
        if not check.passed and where.exact_math_fallback and exact_math_known:
            logger.warning(
                "%s differs from its reference by %.2e on %s (tolerance %.0e): loading it with exact math",
                stored.tag,
                check.max_abs_diff,
                runtime.provider,
                check.tolerance,
            )
            runtime.close()
            runtime = self._open(stored, exact_math=True)
            kind = stored.card.model_spec.output_kind
        check = check_reference(runtime, stored.reference_path, where.reference_tolerance, kind=kind)
        if not check.passed:
            runtime.close()
            raise ReferenceMismatch(
                f"{stored.tag} answers differ from its stored reference by {check.max_abs_diff:.2e} on "
                f"{check.provider} (tolerance {check.tolerance:.0e}); refused"
            )
        logger.info(
            "%s matches its reference on %s: max abs difference %.2e over %d samples",
            stored.tag,
            check.provider,
            check.max_abs_diff,
            check.samples,
        )
        return runtime, check

    async def reload(self, ref: str) -> None:
        try:
            await asyncio.to_thread(self.swap, ref)
        except Exception:
            logger.exception("could not swap %s to %s; still serving the version loaded before", self.name, ref)

    async def recheck(self) -> None:
        if self.served is not None and self.follows_champion:
            await self.reload(await asyncio.to_thread(self.resolve))
        elif self.served is None and self.loaded.is_set() and self.where.engine is not None:
            await self.reload(await asyncio.to_thread(self.resolve))  # the engine was away at start

    def not_ready(self) -> str | None:
        if self.served is None:
            return self.load_error or "the model is still loading"
        return None

    def batcher(self) -> AdaptiveBatcher[Served]:
        """Created on first use, inside the event loop it serves."""
        if self._batcher is None:
            self._batcher = AdaptiveBatcher(
                self._infer,
                max_batch_size=self.where.max_batch_size,
                max_latency_s=self.where.max_latency_s,
                on_batch=self._on_batch if self.serves else None,
                niceness=0 if self.serves else SHADOW_NICENESS,
            )
        return self._batcher

    def _infer(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float32], Served]:
        served = self.served
        assert served is not None  # requests only reach the batcher once a model is loaded
        return served.runtime.run(batch), served

    def _on_batch(self, size: int, seconds: float) -> None:
        metrics.batch_size.labels(model_name=self.name).observe(size)
        metrics.inference_seconds.labels(model_name=self.name).observe(seconds)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        for session in (self._retired, None if self.served is None else self.served.runtime):
            if session is not None:
                session.close()
