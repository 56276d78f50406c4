"""Drive a server with wrk (closed loop, fixed connections) and read its report."""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "%s"
local f = assert(io.open("%s", "rb"))
wrk.body = f:read("*a")
f:close()
"""


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx answers
    requests: int
    client_cpu: float = 0.0  # wrk's CPU seconds per wall second (1.0 = one core busy)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
        found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    return found


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse(output: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    lat = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if rate is None or total is None or "50" not in lat or "99" not in lat:
        raise RuntimeError(f"could not read wrk's report:\n{output}")
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        p50_ms=lat["50"],
        p99_ms=lat["99"],
        errors=errors + (int(non2xx.group(1)) if non2xx else 0),
        requests=int(total.group(1)),
    )


def run(
    url: str,
    body: Mapping[str, object] | bytes,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> WrkResult:
    """One closed-loop run of `seconds` with `connections` concurrent connections.

    `body` is sent as JSON, or as `content_type` (default application/octet-stream) when it is bytes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "body"
        payload.write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
        if content_type is None:
            content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        script = Path(tmp) / "post.lua"
        extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        script.write_text(_LUA % (content_type, payload) + extra)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        output = subprocess.run(
            [
                ensure_wrk(),
                f"-t{threads}",
                f"-c{connections}",
                f"-d{seconds:g}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dataclasses.replace(parse(output), client_cpu=cpu / wall)
