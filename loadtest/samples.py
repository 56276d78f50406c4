"""What the load generators send, made here from what the service says about its model: `GET
/models` gives the default model's input shape, range and classes, and the samples are random
numbers of that shape within that range. The load generators know no model of their own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np


@dataclass(frozen=True)
class Served:
    """The service's default model, as `GET /models` describes it."""

    name: str
    input_kind: str  # 'tensor' (samples as numbers) or 'image' (encoded images)
    input_shape: tuple[int, ...]  # of one sample
    dtype: str
    min_value: float
    max_value: float
    class_names: tuple[str, ...]


def base_url(url: str) -> str:
    """`http://host:port` of a URL such as `http://host:port/predict`."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def served_model(base: str, *, timeout_s: float = 10) -> Served:
    """The default model of the service at `base` (the first of `GET /models`)."""
    answer = httpx.get(f"{base}/models", timeout=timeout_s)
    answer.raise_for_status()
    model = answer.json()["models"][0]
    signature = model["signature"]
    return Served(
        name=model["name"],
        input_kind=model["input_kind"],
        input_shape=tuple(int(n) for n in signature["input_shape"]),
        dtype=signature["dtype"],
        min_value=float(signature["min_value"]),
        max_value=float(signature["max_value"]),
        class_names=tuple(str(c) for c in signature["class_names"]),
    )


def samples(model: Served, count: int, *, seed: int = 0) -> list[Any]:
    """`count` samples for `model`, as JSON numbers: uniform in its range (integers for an integer
    dtype, else two decimals, which keeps the bodies short)."""
    if model.input_kind != "tensor":
        raise ValueError(f"{model.name} takes {model.input_kind} inputs; the load generators send numbers")
    rng = np.random.default_rng(seed)
    shape = (count, *model.input_shape)
    if np.issubdtype(np.dtype(model.dtype), np.integer):
        whole: list[Any] = rng.integers(int(model.min_value), int(model.max_value), size=shape, endpoint=True).tolist()
        return whole
    decimal: list[Any] = rng.uniform(model.min_value, model.max_value, size=shape).round(2).tolist()
    return decimal


def zeros(model: Served) -> Any:
    """One sample of zeros (clipped into the model's range)."""
    return np.full(model.input_shape, min(max(0.0, model.min_value), model.max_value)).tolist()
