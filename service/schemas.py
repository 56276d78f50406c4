"""Request and response models of the HTTP API, named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field

from models import builtin

EXAMPLE_INPUT: list[Any] = builtin.example_input()


class PredictionPublic(BaseModel):
    """One sample's answer."""

    id: UUID = Field(description="Prediction id, a UUIDv7: sorting ids sorts by time.")
    label: str = Field(description="Predicted class name.", examples=["0"])
    confidence: float = Field(description="Probability of the predicted class.", examples=[0.998])
    scores: dict[str, float] = Field(description="Probability of every class, by class name.")
    model_name: str = Field(examples=[builtin.DEFAULT_MODEL_NAME])
    model_version: str = Field(examples=["l7ocjzhgjklzuax4"])


class PredictResponse(BaseModel):
    """Answers in the order of the request's samples."""

    request_id: str = Field(description="The request's X-Request-ID, or one made up for it.")
    predictions: list[PredictionPublic]


class ShadowPredictionPublic(BaseModel):
    """What a shadow of the model predicted for the same sample (never answered to anyone)."""

    model_version: str
    label: str
    confidence: float
    scores: dict[str, float] | list[float]


class StoredPredictionPublic(BaseModel):
    """A prediction as the log holds it."""

    id: UUID
    created_at: datetime
    model_name: str
    model_version: str
    label: str
    confidence: float
    scores: dict[str, float] | list[float] = Field(
        description="By class name when the model is known to this worker, else in class order."
    )
    input: Any | None = Field(
        description="The sample as sent (numbers, or {media_type, base64} for an image); null once erased."
    )
    input_type: str | None = Field(None, description="The media type of an image input; null for numbers.")
    request_id: str
    tags: dict[str, str]
    ingested: bool = Field(description="True once in Postgres; false while only in the Redis stream.")
    shadows: list[ShadowPredictionPublic] = Field(
        default_factory=list, description="What shadows of the model predicted for this sample, once ingested."
    )


class SignaturePublic(BaseModel):
    input_shape: list[int] = Field(description="Shape of one sample.", examples=[[8, 8]])
    dtype: str = Field(examples=["float32"])
    min_value: float = Field(examples=[0.0])
    max_value: float = Field(examples=[16.0])
    class_names: list[str]


class BatchingPublic(BaseModel):
    max_batch_size: int
    max_latency_ms: float
    max_samples_per_request: int


class ReferencePublic(BaseModel):
    """The model's stored reference inputs run again when this worker loaded it."""

    max_abs_diff: float = Field(description="Largest difference of a probability from the reference's (CPU) one.")
    tolerance: float = Field(description="Above it the model is not served (LOOP_REFERENCE_TOLERANCE).")
    samples: int
    provider: str = Field(description="The provider the check ran on: the one that serves.")
    exact_math: bool = Field(description="Whether the provider runs with exact math (no TF32) for this model.")


class ModelPublic(BaseModel):
    """The model this worker serves and how."""

    name: str
    version: str
    provider: str = Field(description="ONNX Runtime execution provider in use.", examples=["CPUExecutionProvider"])
    providers: list[str] = Field(description="Providers of the session, in priority order.")
    fallback_reason: str | None = Field(description="Why CUDA is not in use, when it was wanted.")
    reference: ReferencePublic | None = Field(description="The load-time check; null for a model stored without one.")
    input_kind: str = Field(description="'tensor' (samples as numbers) or 'image' (encoded images).")
    signature: SignaturePublic
    metrics: dict[str, float] = Field(description="Validation figures recorded when the model was built.")
    dataset_id: str
    validation_id: str
    onnx_opset: int
    code_version: str
    batching: BatchingPublic


class ModelsPublic(BaseModel):
    """Every model a worker serves."""

    default: str = Field(description="The model a request that names none is answered by.")
    models: list[ModelPublic] = Field(description="The loaded models, the default first.")
    not_ready: dict[str, str] = Field(description="Models still loading or failed to load, with the reason.")
