"""Images per second per worker for 64x64 PNG uploads, beside JSON tensors, and where the time goes.

    python -m benchmarks.bench_images --seconds 8 --concurrency 1,32

Builds a small image classifier (a 3-layer CNN on 64x64 RGB, seeded random weights, exported to
ONNX and imported with its spec like a team's model), starts `loop serve` with it beside the digits
model (prediction logging on, ingest running, a throwaway database and key prefix), and drives
`/predict` with wrk, one sample per request: the digits as JSON numbers, a PNG as a multipart
upload, the same PNG as base64 JSON. Then py-spy samples the worker under PNG uploads at the
highest concurrency and reports the share of samples in decoding (Pillow), pre-processing and
inference. The digits model must be in the store (`loop train`).
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import harness
from benchmarks.profile_service import worker_pid
from loadtest import wrk
from models import digits, export
from models.importer import import_model
from models.spec import ModelSpec

logger = logging.getLogger("bench_images")

IMAGE_MODEL = "bench-images"
BOUNDARY = "loopbenchboundary"
SPEC = {
    "input": {"kind": "image", "width": 64, "height": 64, "mode": "RGB", "mean": [0.5], "std": [0.25]},
    "classes": ["circle", "square", "triangle"],
    "onnx_input": "image",
}
# Frames of the stack that say what a sample is doing (the first that matches wins).
PHASES = (
    ("decode (Pillow, in models.images.decode)", ("decode (models/images.py",)),
    ("pre-process (resize, normalise, layout)", ("to_tensor (models/images.py",)),
    ("inference (ONNX Runtime)", ("run (models/runtime.py",)),
    ("prediction log (Redis append)", ("(feedback/predictions/log.py",)),
    ("multipart parsing (Starlette)", ("(starlette/formparsers.py",)),
)


def build_model() -> str:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export_onnx(
            model, Path(tmp) / "model.onnx", sample_shape=(3, 64, 64), input_name="image", output_name="logits"
        )
        return import_model(IMAGE_MODEL, path, ModelSpec.model_validate(SPEC)).tag


def png_64() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def multipart(image: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{IMAGE_MODEL}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def phase_shares(collapsed: Path) -> tuple[int, dict[str, float]]:
    counts: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        phase = next((name for name, marks in PHASES if any(m in stack for m in marks)), "everything else")
        counts[phase] += int(n)
    return total, {name: counts[name] / total for name in [p for p, _ in PHASES] + ["everything else"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("var/bench/images"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    image_tag = build_model()
    image = png_64()
    bodies: dict[str, tuple[Mapping[str, object] | bytes, str | None]] = {
        "digit, JSON numbers": ({"samples": [digits.load().images[0].tolist()]}, None),
        "64x64 PNG, multipart upload": (multipart(image), f"multipart/form-data; boundary={BOUNDARY}"),
        "64x64 PNG, base64 JSON": ({"samples": [base64.b64encode(image).decode()], "model": IMAGE_MODEL}, None),
    }
    port = 3981
    url = f"http://127.0.0.1:{port}/predict"
    collapsed = args.out / "stacks-png.txt"
    rows = []
    with harness.throwaway(args.postgres, args.redis) as (database_url, prefix):
        env = {
            "LOOP_MODELS": f"{digits.DEFAULT_MODEL_NAME},{image_tag}",
            "LOOP_DATABASE_URL": database_url,
            "LOOP_REDIS_URL": args.redis,
            "LOOP_REDIS_PREFIX": prefix,
            "LOOP_VAR_DIR": str(args.out / "var"),
            "LOOP_INGEST_METRICS_PORT": "0",
            "LOOP_PORT": str(port),
        }
        command = harness.LOOP_SERVE
        ready = f"http://127.0.0.1:{port}/readyz"
        with harness.running(command, env, ready_url=ready, log=args.out / "serve.log") as process:
            for name, (body, content_type) in bodies.items():
                wrk.run(url, body, connections=8, seconds=2, content_type=content_type)
                for c in levels:
                    result = wrk.run(url, body, connections=c, seconds=args.seconds, content_type=content_type)
                    rows.append((name, c, result))
                    logger.info(
                        "%-30s c=%-3d %8.0f req/s  p50 %6.1f ms  p99 %6.1f ms  errors %d",
                        name,
                        c,
                        result.requests_per_s,
                        result.p50_ms,
                        result.p99_ms,
                        result.errors,
                    )
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            upload, upload_type = bodies["64x64 PNG, multipart upload"]

            def drive() -> None:
                wrk.run(url, upload, connections=max(levels), seconds=args.seconds + 2, content_type=upload_type)

            load = threading.Thread(target=drive)
            load.start()
            time.sleep(1)
            subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(worker_pid(process.pid)),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(collapsed),
                    "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )
            load.join()
    total, shares = phase_shares(collapsed)
    print("\n| body | concurrency | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for name, c, r in rows:
        print(f"| {name} | {c} | {r.requests_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} |")
    print(f"\nworker under PNG uploads at c={max(levels)} ({total} py-spy samples):")
    for name, share in shares.items():
        print(f"  {share:6.1%}  {name}")


if __name__ == "__main__":
    main()
