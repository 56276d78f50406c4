"""Prometheus metrics of the service, exposed on BentoML's /metrics, and the watcher that keeps
the prediction stream's gauges current."""

from __future__ import annotations

import asyncio

import bentoml
import redis

from feedback.keys import Keys
from feedback.predictions import dead_letters as dead_letter_queue
from feedback.predictions import ingest
from feedback.predictions.log import Event

batch_size = bentoml.metrics.Histogram(
    name="loop_batch_size",
    documentation="Samples per model call, after adaptive batching",
    labelnames=["model_name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
inference_seconds = bentoml.metrics.Histogram(
    name="loop_inference_seconds",
    documentation="Time of one model call",
    labelnames=["model_name"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
predictions = bentoml.metrics.Counter(
    name="loop_predictions",
    documentation="Samples answered",
    labelnames=["model_name", "model_version"],
)
fast_path_seconds = bentoml.metrics.Histogram(
    name="loop_fast_path_request_seconds",
    documentation="Prediction requests answered in front of BentoML's stack (service.fast_path): time "
    "from the whole body read to the answer, by route and status (BentoML's request metrics do not see them)",
    labelnames=["route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
model_info = bentoml.metrics.Gauge(
    name="loop_model_info",
    documentation="The model a worker serves (value 1) and its ONNX Runtime provider",
    labelnames=["model_name", "model_version", "provider"],
)
log_records = bentoml.metrics.Counter(
    name="loop_log_records",
    documentation="Prediction records by what happened to them: appended to Redis, spooled, replayed",
    labelnames=["event"],
)
stream_bytes = bentoml.metrics.Gauge(
    name="loop_stream_bytes",
    documentation="Memory the prediction stream takes in Redis (sampled; bounded by LOOP_STREAM_MAX_BYTES)",
)
_HEALTH = ["model_name", "model_version", "window"]
drift_score = bentoml.metrics.Gauge(
    name="loop_drift_score",
    documentation="Population stability index of the latest health window against the version's reference, by kind "
    "(labels, confidence, inputs: the feature that moved most)",
    labelnames=[*_HEALTH, "kind"],
)
drift_p_value = bentoml.metrics.Gauge(
    name="loop_drift_p_value",
    documentation="p-value of the latest window's test against the reference, by kind (inputs: Bonferroni)",
    labelnames=[*_HEALTH, "kind"],
)
drift_alarm = bentoml.metrics.Gauge(
    name="loop_drift_alarm",
    documentation="1 when the latest window's test rejects the reference at LOOP_HEALTH_ALPHA, by kind",
    labelnames=[*_HEALTH, "kind"],
)
estimated_accuracy = bentoml.metrics.Gauge(
    name="loop_estimated_accuracy",
    documentation="Accuracy the latest window's confidences promise, by the reference's calibration",
    labelnames=_HEALTH,
)
judged_accuracy = bentoml.metrics.Gauge(
    name="loop_judged_accuracy",
    documentation="Accuracy reviewers judged on the latest window's settled items",
    labelnames=_HEALTH,
)
stream_lag_entries = bentoml.metrics.Gauge(
    name="loop_stream_lag_entries",
    documentation="Stream entries not yet acknowledged by the ingest workers",
)
stream_lag_seconds = bentoml.metrics.Gauge(
    name="loop_stream_lag_seconds",
    documentation="Age of the oldest stream entry not yet acknowledged by the ingest workers",
)
dead_letters = bentoml.metrics.Gauge(
    name="loop_dead_letters",
    documentation="Prediction entries the ingest workers could not store (alert on > 0; see `loop dead-letters`)",
)

shadow_batches = bentoml.metrics.Counter(
    name="loop_shadow_batches",
    documentation="Answered batches offered to a model's shadow, by outcome (samples, for stored)",
    labelnames=["model_name", "outcome"],
)


def count_log_event(event: Event, n: int) -> None:
    log_records.labels(event=event.value).inc(n)


async def watch_stream(redis_url: str, keys: Keys) -> None:
    """Keep the stream-lag and dead-letter gauges current (until cancelled)."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2)
    try:
        while True:
            try:
                entries, seconds = await asyncio.to_thread(ingest.lag, client, keys)
                stream_lag_entries.set(entries)
                memory: int | None = await asyncio.to_thread(client.memory_usage, keys.stream, 16)
                stream_bytes.set(memory or 0)
                stream_lag_seconds.set(seconds)
                dead_letters.set(await asyncio.to_thread(dead_letter_queue.count, client, keys))
            except redis.RedisError:
                pass
            await asyncio.sleep(2.0)
    finally:
        client.close()
