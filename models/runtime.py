"""ONNX Runtime session wrapper: CUDA first when present, CPU otherwise, never silently."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from models.signature import Signature, to_probabilities

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DevicePreference(StrEnum):
    AUTO = "auto"  # CUDA when the runtime has it and it starts, else CPU (with a warning)
    CPU = "cpu"  # CPU only
    CUDA = "cuda"  # CUDA or fail


class ProviderUnavailable(RuntimeError):
    """CUDA was required but ONNX Runtime could not start it."""


@functools.cache
def cuda_devices() -> tuple[int, str | None]:
    """How many GPUs the NVIDIA driver sees, and why none when it is 0: asked of the driver itself
    (libcuda), so that a machine without a GPU never makes ONNX Runtime try, and fail loudly."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver is installed (libcuda.so.1 cannot be loaded)"
    code = driver.cuInit(0)
    if code != 0:
        return 0, f"the NVIDIA driver finds no usable GPU (cuInit returned {code})"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return 0, "the NVIDIA driver reports no GPU"
    return count.value, None


_said: set[str] = set()


def _say_once(reason: str) -> None:
    """The CPU fallback, in our words, once per process (not once per model or version loaded)."""
    if reason not in _said:
        _said.add(reason)
        logger.warning("running on the CPU: %s", reason)


def _preload_cuda_wheels() -> None:
    """Load CUDA and cuDNN from NVIDIA's pip wheels when they are installed (the CUDA image);
    without them ONNX Runtime looks in the system library path as usual."""
    if importlib.util.find_spec("nvidia") is not None:
        ort.preload_dlls()


class Session(Protocol):
    """What serving needs of a model's session: this process's `OnnxModel`, or one in another
    process that runs the same ONNX file."""

    provider: str
    providers: list[str]
    fallback_reason: str | None
    exact_math: bool

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]: ...

    def close(self) -> None: ...


class OnnxModel:
    """One inference session; `run` is safe to call from one thread at a time per batch."""

    def __init__(
        self,
        path: Path,
        *,
        device: DevicePreference = DevicePreference.AUTO,
        intra_op_threads: int = 1,
        exact_math: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        gpus, no_gpu = cuda_devices() if device is not DevicePreference.CPU and CUDA in available else (0, None)
        if gpus:
            _preload_cuda_wheels()
        wanted = [CUDA, CPU] if gpus else [CPU]
        # Exact math: no TF32 in the CUDA provider's matrix products and convolutions (TF32 keeps
        # 10 bits of mantissa; the model's outputs then differ from the CPU's by up to 1e-2).
        cuda_options = {"use_tf32": "0"} if exact_math else {}
        requested: list[Any] = [(p, cuda_options) if p == CUDA else p for p in wanted if p in available]
        self.exact_math = exact_math
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
        self.providers: list[str] = list(self.session.get_providers())
        self.provider = self.providers[0]
        self.fallback_reason: str | None = None
        if device is not DevicePreference.CPU and self.provider != CUDA:
            if CUDA not in available:
                self.fallback_reason = "CUDA is not used: this ONNX Runtime build has no CUDA provider"
            elif no_gpu is not None:
                self.fallback_reason = f"CUDA is not used: {no_gpu}"
            else:
                self.fallback_reason = "CUDA is not used: its provider failed to start (CUDA or cuDNN libraries)"
            if device is DevicePreference.CUDA:
                raise ProviderUnavailable(self.fallback_reason)
            _say_once(self.fallback_reason)
        inputs = self.session.get_inputs()
        self.input_name: str = inputs[0].name
        logger.info(
            "loaded %s with providers %s (intra-op threads %d)",
            path.name,
            self.providers,
            intra_op_threads,
        )

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        outputs: list[Any] = self.session.run(None, {self.input_name: batch})
        return np.asarray(outputs[0], dtype=np.float32)

    def close(self) -> None:
        """Nothing to release by hand: the session is freed with the object."""


REFERENCE_SAMPLES = 16


def reference_of(
    path: Path, signature: Signature, inputs: NDArray[np.float32] | None = None
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """A model's reference: up to REFERENCE_SAMPLES `inputs` (else seeded samples in the
    signature's range) and the scores ONNX Runtime gives them on the CPU."""
    if inputs is None or len(inputs) == 0:
        rng = np.random.default_rng(0)
        shape = (REFERENCE_SAMPLES, *signature.input_shape)
        inputs = rng.uniform(signature.min_value, signature.max_value, size=shape).astype(np.float32)
    chosen = np.ascontiguousarray(inputs[:REFERENCE_SAMPLES], dtype=np.float32)
    return chosen, OnnxModel(path, device=DevicePreference.CPU).run(chosen)


@dataclass(frozen=True)
class ReferenceCheck:
    """The stored reference run again on the provider that serves: the largest difference of the
    probabilities clients would get, against the tolerance."""

    max_abs_diff: float
    tolerance: float
    samples: int
    provider: str
    exact_math: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_reference(model: Session, reference: Path, tolerance: float, *, kind: str = "logits") -> ReferenceCheck:
    """`kind`: what the graph answers (the spec's `output_kind`), so the probabilities are compared."""
    with np.load(reference) as saved:
        inputs, expected = saved["inputs"], saved["outputs"]
    got = model.run(inputs)
    diff = float(np.max(np.abs(to_probabilities(got, kind) - to_probabilities(expected, kind)))) if len(inputs) else 0.0
    return ReferenceCheck(
        max_abs_diff=diff,
        tolerance=tolerance,
        samples=len(inputs),
        provider=model.provider,
        exact_math=model.exact_math,
    )
