"""One inference process for all of a machine's service workers (`LOOP_INFERENCE=shared`).

`loop serve` then starts `python -m service inference` beside the BentoML workers. The workers
still parse, validate, decode and log, and each keeps its adaptive batcher; but a worker's batch
goes over a Unix socket to this process, which merges the batches of every worker into one model
call. One process holds the accelerator's sessions, so that a GPU gets batches the size of the
whole machine's load rather than one worker's share, and its memory holds each model once.

On the wire every message is one frame:

    u32 header length | u64 payload length | header (JSON object) | payload (raw array bytes)

A worker's `RemoteSession` opens one connection per session. `{"op": "open", "path", "exact_math"}`
is answered with the provider (or `{"error"}`); each `{"op": "run", "dtype", "shape"}` frame, with
the C-ordered array as payload, is answered with the outputs' dtype and shape and their bytes, or
`{"error", "overloaded"}`. One call is in flight per connection. The host keeps a session while
some connection holds it, and shares it between the connections that opened the same file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from feedback.errors import Unavailable
from models.runtime import DevicePreference, OnnxModel, Session
from service.batching import AdaptiveBatcher, Overloaded

logger = logging.getLogger(__name__)

_FRAME = struct.Struct("!IQ")
MAX_HEADER_BYTES = 64 * 1024
DTYPES = {"float32": np.dtype(np.float32)}  # what the served models take and give
STATS_EVERY_S = 30.0


class InferenceUnavailable(Unavailable):
    """The inference process could not be reached, or went away during a call."""


class ProtocolError(ValueError):
    """A frame that does not follow the wire format."""


def _header(raw: bytes) -> dict[str, Any]:
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ProtocolError("a frame's header must be a JSON object")
    return header


def _array(header: dict[str, Any], payload: bytes | bytearray) -> NDArray[Any]:
    """The payload as the array the header describes, checked against its length."""
    dtype = DTYPES.get(str(header.get("dtype")))
    shape = header.get("shape")
    if dtype is None:
        raise ProtocolError(f"dtype must be one of {sorted(DTYPES)}, got {header.get('dtype')!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(f"shape must be a list of sizes, got {shape!r}")
    if math.prod(shape) * dtype.itemsize != len(payload):
        raise ProtocolError(f"shape {shape} of {dtype} is not {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def _sizes(prefix: bytes) -> tuple[int, int]:
    """A frame's header and payload lengths, from its first `_FRAME.size` bytes."""
    header_bytes, payload_bytes = _FRAME.unpack(prefix)
    if header_bytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"a header of {header_bytes} bytes (at most {MAX_HEADER_BYTES})")
    return header_bytes, payload_bytes


def _encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> tuple[bytes, bytes | memoryview]:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(len(raw), len(payload)) + raw, payload


def gpu_pins(processes: int | None, gpus: int, visible: str | None) -> list[str | None]:
    """The GPU each shared inference process is pinned to (a CUDA_VISIBLE_DEVICES entry), one
    process per GPU unless `processes` says otherwise; None: no GPU, no pin."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(gpus)]
    if not gpus or not ids:
        return [None] * (processes or 1)
    return [ids[i % len(ids)] for i in range(processes or len(ids))]


# The host: an asyncio Unix-socket server in the inference process.


Opener = Callable[[Path, bool], Session]  # an ONNX file, exact math -> its session


def onnx_opener(device: DevicePreference, ort_threads: int) -> Opener:
    """Sessions of this process's ONNX Runtime, on `device`."""

    def open_session(path: Path, exact_math: bool) -> Session:
        return OnnxModel(path, device=device, intra_op_threads=ort_threads, exact_math=exact_math)

    return open_session


@dataclass
class _Hosted:
    model: Session
    batcher: AdaptiveBatcher[None]
    holders: int = 0


class InferenceHost:
    """Holds one session per (ONNX file, exact math) and batches the calls of every connection."""

    def __init__(self, open_session: Opener, *, max_batch_size: int, max_latency_s: float) -> None:
        self.open_session = open_session
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.batches = 0  # model calls made, and the samples they held
        self.samples = 0
        self._sessions: dict[tuple[str, bool], _Hosted] = {}
        self._opening = asyncio.Lock()
        self._connections: set[asyncio.Task[None]] = set()

    async def serve(self, path: Path, stop: asyncio.Event) -> None:
        """Listen on `path` (replacing a stale socket) until `stop` is set."""
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._connection, path=str(path), limit=MAX_HEADER_BYTES)
        path.chmod(0o600)  # the workers run as the same user; nobody else may submit work
        stats = asyncio.create_task(self._report())
        logger.info("inference process listening on %s", path)
        try:
            async with server:
                await stop.wait()
        finally:
            stats.cancel()
            for task in list(self._connections):  # a worker's call in flight fails, and it reconnects
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            hosted, self._sessions = list(self._sessions.values()), {}
            for each in hosted:
                await each.batcher.close()
            path.unlink(missing_ok=True)

    async def _report(self) -> None:
        """A line every STATS_EVERY_S while work comes in: how large the merged batches are."""
        seen = (0, 0)
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            batches, samples = self.batches - seen[0], self.samples - seen[1]
            if batches:
                logger.info(
                    "%d model calls in %.0f s, %.1f samples each on average, %d sessions",
                    batches,
                    STATS_EVERY_S,
                    samples / batches,
                    len(self._sessions),
                )
            seen = (self.batches, self.samples)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key: tuple[str, bool] | None = None
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    header, payload = await self._read(reader)
                except asyncio.IncompleteReadError:
                    return  # the worker closed the connection
                if header.get("op") == "open":
                    if key is not None:
                        await self._release(key)
                        key = None
                    wanted = (str(header.get("path")), bool(header.get("exact_math")))
                    try:
                        model = (await self._hold(wanted)).model
                    except Exception as exc:
                        logger.exception("could not open a session for %s", wanted[0])
                        await self._write(writer, {"error": f"{type(exc).__name__}: {exc}"})
                        continue
                    key = wanted
                    info = {"provider": model.provider, "providers": model.providers}
                    await self._write(writer, {**info, "fallback_reason": model.fallback_reason})
                elif header.get("op") == "run" and key is not None:
                    await self._run(writer, self._sessions[key], header, payload)
                else:
                    await self._write(writer, {"error": "send 'open' before 'run'; ops are 'open' and 'run'"})
        except (ProtocolError, ValueError, ConnectionError) as exc:
            logger.warning("dropped an inference connection: %s", exc)
        finally:
            self._connections.discard(task)
            if key is not None:
                await self._release(key)
            writer.close()

    async def _run(self, writer: asyncio.StreamWriter, hosted: _Hosted, header: dict[str, Any], payload: bytes) -> None:
        batch = _array(header, payload)
        try:
            outputs, _ = await hosted.batcher.submit(batch)
        except Overloaded as exc:
            await self._write(writer, {"error": str(exc), "overloaded": True})
            return
        except Exception as exc:  # the model failed on this batch; the connection goes on
            await self._write(writer, {"error": f"{type(exc).__name__}: {exc}"})
            return
        outputs = np.ascontiguousarray(outputs)
        header = {"dtype": str(outputs.dtype), "shape": list(outputs.shape)}
        await self._write(writer, header, outputs.data.cast("B"))

    async def _hold(self, key: tuple[str, bool]) -> _Hosted:
        async with self._opening:  # two workers opening the same file load it once
            hosted = self._sessions.get(key)
            if hosted is None:
                path, exact_math = key
                model = await asyncio.to_thread(self.open_session, Path(path), exact_math)
                batcher = AdaptiveBatcher(
                    lambda batch: (model.run(batch), None),
                    max_batch_size=self.max_batch_size,
                    max_latency_s=self.max_latency_s,
                    on_batch=self._count,
                )
                hosted = self._sessions[key] = _Hosted(model, batcher)
                logger.info("opened %s on %s", path, model.provider)
            hosted.holders += 1
            return hosted

    async def _release(self, key: tuple[str, bool]) -> None:
        async with self._opening:
            hosted = self._sessions.get(key)
            if hosted is None:
                return
            hosted.holders -= 1
            if hosted.holders == 0:
                del self._sessions[key]
                await hosted.batcher.close()
                logger.info("closed %s: no worker holds it", key[0])

    def _count(self, size: int, _seconds: float) -> None:
        self.batches += 1
        self.samples += size

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
        header_bytes, payload_bytes = _sizes(await reader.readexactly(_FRAME.size))
        header = _header(await reader.readexactly(header_bytes))
        return header, await reader.readexactly(payload_bytes)

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, header: dict[str, Any], payload: memoryview | bytes = b"") -> None:
        head, body = _encode(header, payload)
        writer.write(head)
        if body:
            writer.write(body)
        await writer.drain()


# The client: a session of a service worker whose model runs in the inference process.


class RemoteSession:
    """A `models.runtime.Session` run by the inference process at `socket_path`.

    Called from a worker's batcher thread and, once on load, from the thread checking the stored
    reference; a lock keeps one call in flight. A broken connection is opened again on the next
    call, so a restarted inference process is found again without restarting the worker.
    """

    def __init__(
        self, socket_path: Path, onnx_path: Path, *, exact_math: bool = False, timeout_s: float = 30.0
    ) -> None:
        self.socket_path = socket_path
        self.onnx_path = onnx_path
        self.exact_math = exact_math
        self.timeout_s = timeout_s
        self.provider = ""
        self.providers: list[str] = []
        self.fallback_reason: str | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        with self._lock:
            self._connect()

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        array = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            sock = self._sock or self._connect()
            try:
                header, payload = self._call(
                    sock, {"op": "run", "dtype": "float32", "shape": list(array.shape)}, array.data.cast("B")
                )
            except (OSError, ProtocolError) as exc:
                self._drop()
                raise InferenceUnavailable(f"the inference process went away during a call: {exc}") from exc
        if "error" in header:
            raise (Overloaded if header.get("overloaded") else RuntimeError)(header["error"])
        return _array(header, payload)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.socket_path))
            header, _ = self._call(sock, {"op": "open", "path": str(self.onnx_path), "exact_math": self.exact_math})
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise InferenceUnavailable(f"the inference process at {self.socket_path} is not reachable: {exc}") from exc
        if "error" in header:
            sock.close()
            raise RuntimeError(f"the inference process could not open {self.onnx_path.name}: {header['error']}")
        self.provider, self.providers = str(header["provider"]), list(header["providers"])
        self.fallback_reason = header.get("fallback_reason")
        self._sock = sock
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _call(
        sock: socket.socket, header: dict[str, Any], payload: memoryview | bytes = b""
    ) -> tuple[dict[str, Any], bytearray]:
        head, body = _encode(header, payload)
        sock.sendall(head)
        if body:
            sock.sendall(body)
        header_bytes, payload_bytes = _sizes(bytes(_recv(sock, _FRAME.size)))
        return _header(bytes(_recv(sock, header_bytes))), _recv(sock, payload_bytes)


def _recv(sock: socket.socket, n: int) -> bytearray:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        chunk = sock.recv_into(view[got:])
        if chunk == 0:
            raise ConnectionResetError("the inference process closed the connection")
        got += chunk
    return buffer


def run_host(host: InferenceHost, path: Path) -> None:
    """Serve until SIGTERM or SIGINT (the process's main function)."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await host.serve(path, stop)

    asyncio.run(main())
    logger.info(
        "inference process stopped (%d model calls, %d samples; pid %d)", host.batches, host.samples, os.getpid()
    )
