"""Seeded, recorded training protocol."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The full protocol: two runs with the same config and data give the same model."""

    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_error: float
    validation_loss: float | None = None
    validation_error: float | None = None


@dataclass
class History:
    epochs: list[EpochMetrics] = field(default_factory=list)


class Normalised(nn.Module):
    """Wraps a network so it takes raw (N, 8, 8) pixels in [0, scale]: the serving and training
    graphs share one normalisation, so they cannot drift apart."""

    def __init__(self, network: nn.Module, scale: float) -> None:
        super().__init__()
        self.network = network
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.network(x.unsqueeze(1) / self.scale)
        return logits


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    x_train: NDArray[np.float32],
    y_train: NDArray[np.int64],
    config: TrainConfig,
    *,
    x_validation: NDArray[np.float32] | None = None,
    y_validation: NDArray[np.int64] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> History:
    """Train `model` in place with `config`; evaluates on the validation data after each epoch."""
    if config.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {config.optimizer!r}; supported: 'adamw'")
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total_loss, wrong = 0.0, 0
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            logits = model(x[idx])
            loss = loss_fn(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            wrong += int((logits.argmax(1) != y[idx]).sum())
        scheduler.step()
        metrics = EpochMetrics(epoch=epoch, train_loss=total_loss / len(x), train_error=wrong / len(x))
        if x_validation is not None and y_validation is not None:
            val_logits = predict_logits(model, x_validation)
            val_loss = float(loss_fn(torch.from_numpy(val_logits), torch.from_numpy(y_validation)))
            metrics.validation_loss = val_loss
            metrics.validation_error = float((val_logits.argmax(1) != y_validation).mean())
        history.epochs.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
        logger.debug("epoch %d: %s", epoch, metrics)
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: NDArray[np.float32], batch_size: int = 512) -> NDArray[np.float32]:
    was_training = model.training
    model.eval()
    chunks = [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return np.concatenate(chunks).astype(np.float32)
