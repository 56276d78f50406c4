"""The second built-in task: coloured shapes on noisy backgrounds, drawn deterministically with Pillow.

Each image is 64x64 RGB: one shape of a class (circle, square, triangle, star, cross), a random
colour, size, position and rotation, on a noisy background of another colour. The same seed gives
the same pixels and the same PNG bytes, so the data set (and its DVC hash) can be made again
anywhere instead of being downloaded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.spec import ImageInput, ModelSpec

logger = logging.getLogger(__name__)

MODEL_NAME = "shapes-cnn"
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZE = 64
DEFAULT_PER_CLASS = 600
TRAINER = "models.trainers:image_cnn"


def spec() -> ModelSpec:
    """What the shapes model takes and answers: 64x64 RGB images, normalised around grey."""
    image = ImageInput(width=SIZE, height=SIZE, mode="RGB", mean=(0.5,), std=(0.25,), resize="stretch")
    return ModelSpec(input=image, classes=CLASS_NAMES, onnx_input="image", onnx_output="logits", trainer=TRAINER)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        radii = [r] * 4
    elif kind == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        radii = [r] * 3
    elif kind == "star":
        corners = [(-math.pi / 2 + k * math.pi / 5) for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    elif kind == "cross":
        w = 0.34  # half the bar width, as a share of r
        outline = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        corners = [math.atan2(y, x) for x, y in outline]
        radii = [r * math.hypot(x, y) / math.sqrt(2) * 1.3 for x, y in outline]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return [(cx + q * math.cos(a + angle), cy + q * math.sin(a + angle)) for a, q in zip(corners, radii, strict=True)]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return (int(rng.integers(0, 256)), int(rng.integers(0, 256)), int(rng.integers(0, 256)))


def _far_colour(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour clearly different from `other` (the shape must stay visible on its background)."""
    while True:
        colour = _colour(rng)
        if sum(abs(a - b) for a, b in zip(colour, other, strict=True)) > 180:
            return colour


def draw(kind: str, rng: np.random.Generator) -> Image.Image:
    """One image of a shape of `kind`, every choice drawn from `rng`."""
    background = _colour(rng)
    noise = rng.normal(0, 18, size=(SIZE, SIZE, 3))
    pixels = np.clip(np.asarray(background, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    canvas = ImageDraw.Draw(image)
    colour = _far_colour(rng, background)
    r = float(rng.uniform(10, 24))
    cx, cy = (float(rng.uniform(r + 2, SIZE - r - 2)) for _ in range(2))
    angle = float(rng.uniform(0, 2 * math.pi))
    if kind == "circle":
        squash = float(rng.uniform(0.85, 1.0))  # a little oval at most
        canvas.ellipse((cx - r, cy - r * squash, cx + r, cy + r * squash), fill=colour)
    else:
        canvas.polygon(_polygon(kind, cx, cy, r, angle), fill=colour)
    return image


def write(
    folder: Path,
    *,
    per_class: int = DEFAULT_PER_CLASS,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write `per_class` PNGs of every class as `folder/<class>/<nnnnn>.png`; returns how many."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    total = per_class * len(CLASS_NAMES)
    done = 0
    for index, kind in enumerate(CLASS_NAMES):
        rng = np.random.default_rng([seed, index])  # each class its own stream: more of one keeps the rest
        target = folder / kind
        target.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            draw(kind, rng).save(target / f"{n:05d}.png", format="PNG", optimize=False)
            done += 1
            if progress is not None:
                progress(done, total)
    logger.info("wrote %d shapes images (%d per class) to %s", total, per_class, folder)
    return total
