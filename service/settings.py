"""All configuration, read from the environment (prefix LOOP_) or a .env file, in one place."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from feedback.predictions.blobs import BlobStore
from feedback.predictions.log import LogPolicy
from feedback.review.weighting import Weighting
from feedback.shadow import Policy, Rules
from models.builtin import DEFAULT_MODEL_NAME
from models.runtime import DevicePreference
from service.limits import BodyLimits
from service.remote import Engine

if TYPE_CHECKING:
    from feedback.health import HealthConfig

CHAMPION = "champion"  # the model tag that follows promotions


def parse_models(spec: str) -> list[tuple[str, str]]:
    """`a,b:v3` -> [(a, champion), (b, v3)]; names must be distinct."""
    entries = []
    for part in spec.split(","):
        name, _, tag = part.strip().partition(":")
        if not name:
            raise ValueError(f"LOOP_MODELS has an empty entry: {spec!r}")
        entries.append((name, tag or CHAMPION))
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"LOOP_MODELS names a model twice: {spec!r}")
    return entries


class Settings(BaseSettings):
    """Every variable is documented in docs/settings.md; keep the two in step."""

    model_config = SettingsConfigDict(env_prefix="LOOP_", env_file=".env", extra="ignore")

    model_name: str = Field(DEFAULT_MODEL_NAME, description="Model to serve, by name in the BentoML store.")
    model_tag: str = Field(
        "champion",
        description="Version of that model: 'champion' follows promotions (before the first, the newest); "
        "'latest' is the newest; anything else pins a version.",
    )
    models: str | None = Field(
        None,
        description="Models to serve, comma-separated, the first the default: NAME follows its champion, "
        "NAME:VERSION pins one. Unset: LOOP_MODEL_NAME with LOOP_MODEL_TAG.",
    )
    device: DevicePreference = Field(
        DevicePreference.AUTO, description="auto: CUDA if it starts, else CPU; cpu; cuda (fail without it)."
    )
    ort_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads per worker.")
    max_batch_size: int = Field(64, ge=1, le=4096, description="Most samples merged into one model call.")
    max_latency_ms: float = Field(
        1000.0, gt=0, description="A request queued longer than this is answered 503 instead of run."
    )
    max_samples_per_request: int = Field(256, ge=1, le=65536, description="Most samples in one request.")
    max_body_bytes: int = Field(
        4 * 2**20, ge=1024, description="Largest request body on the prediction routes (larger: 413 unread)."
    )
    max_other_body_bytes: int = Field(
        2**20, ge=1024, description="Largest request body on the review and admin routes (larger: 413 unread)."
    )
    host: str = Field("127.0.0.1", description="Address `loop serve` binds.")
    port: int = Field(3000, ge=1, le=65535, description="Port `loop serve` binds.")
    workers: int = Field(1, ge=1, le=64, description="Service worker processes.")
    inference: Literal["worker", "shared", "remote"] = Field(
        "worker",
        description="worker: each service worker runs its own ONNX Runtime sessions; shared: `loop serve` "
        "starts one inference process that batches across all workers (for a GPU); remote: the batches go to "
        "the Open Inference Protocol engine at LOOP_INFERENCE_URL (Triton, KServe, `loop engine`).",
    )
    inference_url: str | None = Field(
        None,
        description="The engine of LOOP_INFERENCE=remote: http://host:port, https://host:port or grpc://host:port.",
    )
    inference_repository: Path | None = Field(
        None,
        description="A model repository the engine reads too: the service writes each version it serves there and "
        "asks the engine to load it. Unset: the engine's repository holds them already (`loop models export-triton`).",
    )
    inference_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Longest a call to the engine of LOOP_INFERENCE=remote may take (then 503)."
    )
    inference_processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Shared inference processes, each on a GPU of its own; unset: one per GPU the NVIDIA "
        "driver sees (one without a GPU). Worker i uses process i mod N.",
    )
    inference_socket: Path | None = Field(
        None,
        description="Unix socket of the first shared inference process (the next ones add -1, -2, ...); "
        "unset: in the temp folder, by port.",
    )
    inference_max_batch_size: int = Field(
        256, ge=1, le=65536, description="Most samples the shared inference process merges into one model call."
    )
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools", description="uvicorn's HTTP parser: httptools (C, the faster) or h11 (pure Python)."
    )
    access_log_predictions: bool = Field(
        False, description="BentoML's access log line for every prediction request (off: the other routes only)."
    )
    trace_predictions: bool = Field(
        False, description="OpenTelemetry spans for prediction requests (off: the other routes only)."
    )
    fast_path: bool = Field(
        True,
        description="Answer POST /predict with a JSON body in front of BentoML's ASGI stack (off: through "
        "BentoML's API, as when prediction requests are access-logged or traced).",
    )
    statement_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest a Postgres statement of the service may run (then 503)."
    )
    max_concurrency: int = Field(
        512, ge=1, le=65536, description="Requests one worker takes at once; beyond, 429 (bounds every queue)."
    )
    var_dir: Path = Field(Path("var"), description="Local state: validation split, spool, embedded servers' data.")

    database_url: str | None = Field(
        None, description="Postgres URL; unset: `loop serve` starts an embedded server under var/."
    )
    redis_url: str | None = Field(
        None, description="Redis URL; unset: `loop serve` starts an embedded server under var/."
    )
    redis_prefix: str = Field("loop", min_length=1, description="Prefix of every Redis key.")
    log_predictions: bool = Field(True, description="Store every prediction (off only for benchmarks).")
    log_policy: LogPolicy = Field(
        LogPolicy.SPOOL, description="When Redis is unreachable: spool to disk, or refuse with 503."
    )
    blob_url: str | None = Field(
        None,
        description="Object store of large inputs (an fsspec URL: a folder, or s3://bucket/prefix); "
        "unset: the folder var/blobs.",
    )
    blob_min_bytes: int = Field(
        1024, ge=1, description="Inputs at least this large (images) are kept in the object store, not in Postgres."
    )
    stream_max_bytes: int = Field(
        1 << 30,
        ge=0,
        description="Most memory the prediction stream may take in Redis (it holds what the ingest worker has not "
        "stored yet); past it, records are spooled (or refused, by LOOP_LOG_POLICY) until it is back under 90%. "
        "0: no bound.",
    )
    embedded_postgres_port: int = Field(54329, ge=1, le=65535, description="Port of the embedded Postgres.")
    embedded_redis_port: int = Field(63799, ge=1, le=65535, description="Port of the embedded Redis.")
    ingest_batch_size: int = Field(2000, ge=1, le=100_000, description="Stream entries per Postgres insert.")
    ingest_claim_idle_ms: int = Field(
        30_000, ge=100, description="Pending entries idle this long are taken from a dead consumer."
    )
    ingest_linger_ms: int = Field(
        100, ge=0, le=10_000, description="After a short batch, wait this long before the next read."
    )
    ingest_consumer: str | None = Field(None, description="Consumer name; unset: host name and process id.")
    review_lease_seconds: float = Field(300.0, ge=1, le=3600, description="How long a claimed item stays yours.")
    review_overlap: int = Field(2, ge=1, le=10, description="Reviews wanted for items in the overlap share.")
    review_max_leases: int = Field(
        200, ge=1, le=100_000, description="Live leases one reviewer may hold; a claim beyond is refused (409)."
    )
    review_overlap_share: float = Field(
        0.1, ge=0, le=1, description="Share of items (chosen by id) that ask for `review_overlap` reviews."
    )
    review_shadow_mixed_share: float = Field(
        0.2,
        ge=0,
        le=1,
        description="The `disagree` review order: share of shadowed items (chosen by id) offered among the "
        "disagreements, so that the shadow's evidence stays unbiased.",
    )
    review_gold_share: float = Field(
        0.05, ge=0, le=1, description="Chance of each place of a claim to hold a gold item the reviewer never answered."
    )
    labels_weighting: bool = Field(
        False,
        description="Compile training versions with the disputes that labels weighted by reviewer reliability "
        "(Dawid-Skene) settle at labels_min_confidence; the others wait for an admin.",
    )
    labels_min_confidence: float = Field(
        0.95, ge=0.5, le=1, description="How likely a weighted label must be to settle a dispute."
    )

    @property
    def weighting(self) -> Weighting:
        return Weighting(self.labels_weighting, self.labels_min_confidence)

    datasets_url: str | None = Field(
        None, description="Where dataset versions are written (a folder or any fsspec URL); unset: var/datasets."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; unset: a SQLite store var/mlflow.db, artifacts under var/mlartifacts."
    )
    promotion_margin: float = Field(
        0.0, ge=0, le=1, description="A candidate must beat the champion's validation accuracy by more than this."
    )
    shadow_policy: Policy = Field(
        Policy.NOT_WORSE,
        description="Deciding on a shadow: `not_worse` (passes the frozen-set gate and is not worse on judged live "
        "items at LOOP_SHADOW_ALPHA) or `better` (better on judged live items at LOOP_SHADOW_ALPHA).",
    )
    shadow_alpha: float = Field(0.05, gt=0, lt=1, description="The significance of McNemar's test on live items.")
    shadow_min_judged: int = Field(
        50, ge=0, description="Judged live items a decision on a shadow needs; with fewer, it is rejected."
    )
    reference_tolerance: float = Field(
        1e-3,
        gt=0,
        le=1,
        description="Largest difference of a probability from the model's stored reference "
        "(run again on the serving provider at load) for the model to be served.",
    )
    exact_math_fallback: bool = Field(
        True, description="Above the tolerance, load the model again with the provider's exact math (no TF32)."
    )
    label_studio_url: str | None = Field(
        None,
        description="Label Studio's address (e.g. http://label-studio:8080): the images of its tasks given as "
        "paths (/data/upload/...) are fetched from there, with LOOP_LABEL_STUDIO_TOKEN.",
    )
    label_studio_token: str | None = Field(
        None, description="A Label Studio user's (legacy) API token, sent only to LOOP_LABEL_STUDIO_URL."
    )
    fetch_hosts: str = Field(
        "",
        description="Other origins (scheme://host[:port], comma-separated) whose image URLs a Label Studio "
        "task may name; any other URL is refused.",
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description="Days of predictions kept: older daily partitions are dropped whole (their protected items "
        "kept first). Unset: everything is kept.",
    )
    partitions_ahead_days: int = Field(7, ge=1, le=366, description="Daily partitions made ahead of today.")
    maintenance_interval_s: float = Field(
        3600.0, gt=0, description="How often `loop ingest` makes partitions ahead and applies retention."
    )
    ingest_metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus port of `loop ingest` (0: none).")
    health_interval_s: float = Field(
        60.0,
        gt=0,
        description="How often `loop ingest` folds new predictions into the health windows, and the "
        "service refreshes its health gauges.",
    )
    health_delay_s: float = Field(
        60.0, ge=0, description="Predictions younger than this wait for the next health pass (late rows arrive)."
    )
    health_lookback_hours: float = Field(48.0, gt=0, description="Where a model's first health pass starts.")
    health_alpha: float = Field(
        0.01, gt=0, lt=1, description="Level of the drift tests: the share of undrifted windows that raise an alarm."
    )
    live_validation_share: float = Field(
        0.01,
        ge=0,
        le=0.5,
        description="Share of predictions drawn for the live validation set (kept out of training; "
        "the `validation` review order); 0: none.",
    )
    live_validation_days: float = Field(
        30.0, gt=0, description="A live validation version holds the judged live items of these days."
    )
    live_validation_min_judged: int = Field(100, ge=1, description="Judged live items a live validation version needs.")
    live_validation_refresh_hours: float = Field(
        168.0,
        gt=0,
        description="How often `loop ingest` freezes a new live validation version (when there are new judged items).",
    )
    health_windows: str = Field(
        "1,24", pattern=r"^\d+(,\d+)*$", description="Window sizes in hours the health gauges report (hourly, daily)."
    )

    @property
    def split_path(self) -> Path:
        return self.var_dir / "validation" / f"{self.model_name}-split.json"

    @field_validator("models")
    @classmethod
    def _models(cls, value: str | None) -> str | None:
        if value is not None:
            parse_models(value)  # raises naming the problem
        return value

    @model_validator(mode="after")
    def _engine(self) -> Settings:
        if self.inference == "remote":
            _ = self.engine  # raises naming the problem
        return self

    @property
    def engine(self) -> Engine | None:
        """The engine of LOOP_INFERENCE=remote; None otherwise."""
        if self.inference != "remote":
            return None
        if not self.inference_url:
            raise ValueError("LOOP_INFERENCE=remote needs LOOP_INFERENCE_URL (http://host:port or grpc://host:port)")
        return Engine(self.inference_url, self.inference_timeout_s, self.inference_repository)

    @property
    def health_config(self) -> HealthConfig:
        from feedback.health import HealthConfig

        return HealthConfig(
            delay_s=self.health_delay_s,
            lookback_s=self.health_lookback_hours * 3600,
            live_share=self.live_validation_share,
        )

    @property
    def health_window_hours(self) -> list[int]:
        return sorted({int(h) for h in self.health_windows.split(",") if int(h) > 0})

    @property
    def served_models(self) -> list[tuple[str, str]]:
        """(name, tag) of every model to serve, the default first."""
        return parse_models(self.models) if self.models else [(self.model_name, self.model_tag)]

    @property
    def follows_champion(self) -> bool:
        return self.model_tag == "champion"

    @property
    def model_ref(self) -> str:
        """The store reference to load when no champion is known: 'champion' falls back to the newest."""
        return f"{self.model_name}:{'latest' if self.follows_champion else self.model_tag}"

    @property
    def datasets_root(self) -> str:
        return self.datasets_url or str((self.var_dir / "datasets").resolve())

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.var_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_uri(self) -> str:
        return (self.var_dir / "mlartifacts").resolve().as_uri()

    @property
    def shadow_rules(self) -> Rules:
        return Rules(self.shadow_policy, self.shadow_alpha, self.shadow_min_judged, self.promotion_margin)

    @property
    def body_limits(self) -> BodyLimits:
        return BodyLimits(predict=self.max_body_bytes, other=self.max_other_body_bytes)

    @property
    def shared_inference(self) -> bool:
        return self.inference == "shared"

    def inference_socket_for(self, index: int) -> Path:
        """Where shared inference process `index` (from 0) listens."""
        first = self.inference_socket or Path(tempfile.gettempdir()) / f"loop-inference-{self.port}.sock"
        return first if index == 0 else first.with_name(f"{first.stem}-{index}{first.suffix}")

    @property
    def spool_dir(self) -> Path:
        return self.var_dir / "spool"

    def blob_store(self) -> BlobStore:
        """The object store of large inputs (attached to the database by whoever reads or writes it)."""
        return BlobStore(self.blob_url or str((self.var_dir / "blobs").resolve()), min_bytes=self.blob_min_bytes)
