"""Network definitions."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 images; about 0.15 M parameters, trains in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class WideMLP(nn.Module):
    """A compute-bound network for benchmarks: three 2048-wide layers, about 8.5 M parameters.

    At batch 1 every call streams all 34 MB of weights for one sample; a batch reuses them, so
    this is where batching pays, unlike the small CNN whose cost is all overhead.
    """

    def __init__(self, inputs: int = 64, width: int = 2048, depth: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = inputs
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(x)
        return logits


class SmallConvNet(nn.Module):
    """A small convolutional classifier for images of any size, channel count and class count.

    Four conv-batchnorm-ReLU blocks (three halving the resolution, so a 64x64 input is seen
    through a 38-pixel receptive field), global average pooling and a linear head: about 61 k
    parameters at `width` 16, trained from scratch in minutes on a CPU.
    `channels_last` takes (N, H, W, C) batches (an NHWC spec) instead of (N, C, H, W).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 16, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last

        def block(inputs: int, outputs: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(inputs, outputs, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(outputs),
                nn.ReLU(),
            ]
            return [*layers, nn.MaxPool2d(2, ceil_mode=True)] if pool else layers

        self.features = nn.Sequential(
            *block(channels, width, pool=True),
            *block(width, 2 * width, pool=True),
            *block(2 * width, 4 * width, pool=True),
            *block(4 * width, 4 * width, pool=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        logits: torch.Tensor = self.head(self.features(x))
        return logits
