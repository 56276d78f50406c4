"""The BentoML model store: served models are found by name and tag, never by file path."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, NotFound
from numpy.typing import NDArray

from models.signature import Signature
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"


class ModelNotFound(LookupError):
    """No model with that name and tag is in the store."""


class InvalidModelTag(ValueError):
    """Not a BentoML tag (`name[:version]`, letters, digits, '-', '_' and '.'): no model has it."""


@dataclass(frozen=True)
class ModelCard:
    """Everything recorded about a stored model, kept as the store entry's metadata."""

    signature: Signature
    metrics: dict[str, float]
    dataset_id: str
    validation_id: str
    opset: int
    code_version: str
    parity_max_abs_diff: float
    extra: dict[str, Any] = field(default_factory=dict)
    spec: ModelSpec | None = None  # None for models stored before specs: `model_spec` derives one

    @cached_property  # read on every batch served
    def model_spec(self) -> ModelSpec:
        return self.spec if self.spec is not None else ModelSpec.of_signature(self.signature)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "spec": self.model_spec.to_dict(),
            "signature": self.signature.to_dict(),
            "metrics": dict(self.metrics),
            "dataset_id": self.dataset_id,
            "validation_id": self.validation_id,
            "onnx_opset": self.opset,
            "code_version": self.code_version,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_metadata(cls, raw: dict[str, Any]) -> ModelCard:
        return cls(
            signature=Signature.from_dict(raw["signature"]),
            metrics={k: float(v) for k, v in raw.get("metrics", {}).items()},
            dataset_id=str(raw.get("dataset_id", "")),
            validation_id=str(raw.get("validation_id", "")),
            opset=int(raw.get("onnx_opset", 0)),
            code_version=str(raw.get("code_version", "unknown")),
            parity_max_abs_diff=float(raw.get("parity_max_abs_diff", float("nan"))),
            extra=dict(raw.get("extra", {})),
            spec=ModelSpec.model_validate(raw["spec"]) if "spec" in raw else None,
        )


@dataclass(frozen=True)
class StoredModel:
    name: str
    version: str
    onnx_path: Path
    card: ModelCard

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def reference_path(self) -> Path | None:
        """The reference inputs and outputs saved with the model (None for models saved before)."""
        path = self.onnx_path.with_name(REFERENCE_FILE)
        return path if path.exists() else None


def save(
    name: str,
    onnx_path: Path,
    card: ModelCard,
    *,
    labels: dict[str, str] | None = None,
    reference_inputs: NDArray[np.float32] | None = None,
) -> StoredModel:
    """Copy an exported ONNX file into the store as a new version of `name`, with its reference:
    inputs (`reference_inputs`, else seeded samples in the signature's range) and the scores ONNX
    Runtime gives them on the CPU, run again by every worker that loads the model."""
    from models.runtime import reference_of  # the runtime needs onnxruntime; reading the store does not

    inputs, outputs = reference_of(onnx_path, card.signature, reference_inputs)
    with bentoml.models.create(name, labels=labels or {}, metadata=card.to_metadata()) as entry:
        shutil.copyfile(onnx_path, entry.path_of(ONNX_FILE))
        np.savez(entry.path_of(REFERENCE_FILE), inputs=inputs, outputs=outputs)
    stored = get(f"{name}:{entry.tag.version}")
    logger.info("saved %s to the model store", stored.tag)
    return stored


def get(tag: str) -> StoredModel:
    """Find a model by `name` or `name:version` (`name:latest` is the newest)."""
    try:
        entry = bentoml.models.get(tag)
    except NotFound:
        raise ModelNotFound(f"model {tag!r} is not in the BentoML model store") from None
    except BentoMLException:  # BentoML's answer to a malformed tag
        raise InvalidModelTag(
            f"{tag!r} is not a model tag: name[:version] of letters, digits, '-', '_' and '.'"
        ) from None
    onnx_path = Path(entry.path_of(ONNX_FILE))
    if not onnx_path.exists():
        raise ModelNotFound(f"model {tag!r} has no {ONNX_FILE}; it was not saved by this project")
    return StoredModel(
        name=entry.tag.name,
        version=str(entry.tag.version),
        onnx_path=onnx_path,
        card=ModelCard.from_metadata(dict(entry.info.metadata)),
    )


def list_models(name: str | None = None) -> list[StoredModel]:
    """Every model this project stored (all of `name`'s versions, if given), oldest first per name;
    `InvalidModelTag` for a name no model can have."""
    try:
        listed = bentoml.models.list(name)
    except NotFound:  # BentoML's answer when no version of `name` exists
        return []
    except (BentoMLException, ValueError):  # BentoML's answer to a name no tag can have
        raise InvalidModelTag(f"{name!r} is not a model name: letters, digits, '-', '_' and '.'") from None
    entries = sorted(listed, key=lambda e: (e.tag.name, e.creation_time))
    found = []
    for entry in entries:
        onnx_path = Path(entry.path_of(ONNX_FILE))
        if onnx_path.exists() and "signature" in entry.info.metadata:  # saved by this project
            card = ModelCard.from_metadata(dict(entry.info.metadata))
            found.append(StoredModel(entry.tag.name, str(entry.tag.version), onnx_path, card))
    return found


def exists(tag: str) -> bool:
    try:
        get(tag)
    except (ModelNotFound, InvalidModelTag):
        return False
    return True


def version_number(stored: StoredModel) -> int:
    """The version's number as Triton numbers a model's versions: the oldest stored is 1. A number
    never changes, as the store only adds versions."""
    versions = [each.version for each in list_models(stored.name)]
    if stored.version not in versions:
        raise ModelNotFound(f"{stored.tag} is not in the model store")
    return versions.index(stored.version) + 1
