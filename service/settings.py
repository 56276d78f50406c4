"""All configuration, read from the environment (prefix LOOP_) or a .env file, in one place."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.digits import DEFAULT_MODEL_NAME
from models.runtime import DevicePreference


class Settings(BaseSettings):
    """Every variable is documented in the README; keep the two in step."""

    model_config = SettingsConfigDict(env_prefix="LOOP_", env_file=".env", extra="ignore")

    model_name: str = Field(DEFAULT_MODEL_NAME, description="Model to serve, by name in the BentoML store.")
    model_tag: str = Field("latest", description="Version of that model; 'latest' is the newest.")
    device: DevicePreference = Field(
        DevicePreference.AUTO, description="auto: CUDA if it starts, else CPU; cpu; cuda (fail without it)."
    )
    ort_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads per worker.")
    max_batch_size: int = Field(64, ge=1, le=4096, description="Most samples merged into one model call.")
    max_latency_ms: float = Field(
        1000.0, gt=0, description="A request queued longer than this is answered 503 instead of run."
    )
    max_samples_per_request: int = Field(256, ge=1, le=65536, description="Most samples in one request.")
    host: str = Field("127.0.0.1", description="Address `loop serve` binds.")
    port: int = Field(3000, ge=1, le=65535, description="Port `loop serve` binds.")
    workers: int = Field(1, ge=1, le=64, description="Service worker processes.")
    var_dir: Path = Field(Path("var"), description="Where local state lives (validation split, data).")

    @property
    def split_path(self) -> Path:
        return self.var_dir / "validation" / f"{self.model_name}-split.json"

    @property
    def model_ref(self) -> str:
        return f"{self.model_name}:{self.model_tag}"
