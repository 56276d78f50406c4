"""The shared inference process: its wire, batches merged across connections, and a host that
goes away and comes back, with the session's model on a real Unix socket."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from numpy.typing import NDArray

from models import digits
from models.pipeline import BuildResult
from models.runtime import DevicePreference, OnnxModel, Session
from service.batching import Overloaded
from service.inference import InferenceHost, InferenceUnavailable, Opener, RemoteSession, onnx_opener
from tests.integration.conftest import RunningService


class Slow:
    """A session that takes `delay_s` a call, so that calls arriving meanwhile queue up."""

    def __init__(self, model: OnnxModel, delay_s: float) -> None:
        self.model, self.delay_s = model, delay_s
        self.provider, self.providers = model.provider, model.providers
        self.fallback_reason, self.exact_math = model.fallback_reason, model.exact_math
        self.sizes: list[int] = []

    def run(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        self.sizes.append(len(batch))
        time.sleep(self.delay_s)
        return self.model.run(batch)

    def close(self) -> None:
        pass


@contextmanager
def hosting(path: Path, open_session: Opener, *, max_latency_s: float = 5.0) -> Iterator[InferenceHost]:
    """An inference host on `path` in a thread of this process, stopped on exit."""
    host = InferenceHost(open_session, max_batch_size=64, max_latency_s=max_latency_s)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(host.serve(path, stop),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not _listening(path):  # the socket file appears at bind(), a moment before listen()
        assert thread.is_alive() and time.monotonic() < deadline, "the host did not start"
        time.sleep(0.02)
    try:
        yield host
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        assert not thread.is_alive()


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@pytest.fixture
def onnx_path(trained_model: BuildResult) -> Path:
    return trained_model.stored.onnx_path


@pytest.fixture
def samples(trained_model: BuildResult) -> NDArray[np.float32]:
    shape = trained_model.stored.card.signature.input_shape
    return np.random.default_rng(0).random((8, *shape), dtype=np.float32)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "inference.sock"


def test_a_remote_session_answers_what_the_model_answers_in_process(
    sock: Path, onnx_path: Path, samples: NDArray[np.float32]
) -> None:
    local = OnnxModel(onnx_path, device=DevicePreference.CPU)
    with hosting(sock, onnx_opener(DevicePreference.CPU, 1)) as host:
        remote = RemoteSession(sock, onnx_path)
        try:
            assert remote.provider == local.provider and remote.providers == local.providers
            got = remote.run(samples)
            assert got.dtype == np.float32 and got.shape == local.run(samples).shape
            np.testing.assert_allclose(got, local.run(samples), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(remote.run(samples[:1]), local.run(samples[:1]), rtol=1e-6, atol=1e-6)
            assert (host.batches, host.samples) == (2, 9)
        finally:
            remote.close()


def test_calls_of_several_workers_are_merged_into_one_model_call(
    sock: Path, onnx_path: Path, samples: NDArray[np.float32]
) -> None:
    opened: list[Slow] = []

    def open_slow(path: Path, exact_math: bool) -> Session:
        opened.append(Slow(OnnxModel(path, device=DevicePreference.CPU), delay_s=0.05))
        return opened[-1]

    local = OnnxModel(onnx_path, device=DevicePreference.CPU)
    workers, calls = 4, 5
    with hosting(sock, open_slow) as host:
        remotes = [RemoteSession(sock, onnx_path) for _ in range(workers)]
        assert len(opened) == 1  # one session for every connection to the same file
        start = threading.Barrier(workers)
        results: dict[int, list[NDArray[np.float32]]] = {}

        def worker(i: int) -> None:
            start.wait()
            results[i] = [remotes[i].run(samples[i : i + 1]) for _ in range(calls)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for remote in remotes:
            remote.close()
    for i in range(workers):
        assert len(results[i]) == calls
        for got in results[i]:
            np.testing.assert_allclose(got, local.run(samples[i : i + 1]), rtol=1e-5, atol=1e-6)
    assert host.samples == workers * calls
    assert host.batches < workers * calls  # calls that arrived while the model ran were merged
    assert max(opened[0].sizes) > 1


def test_a_worker_finds_a_restarted_host_again(sock: Path, onnx_path: Path, samples: NDArray[np.float32]) -> None:
    opener = onnx_opener(DevicePreference.CPU, 1)
    with hosting(sock, opener):
        remote = RemoteSession(sock, onnx_path)
        before = remote.run(samples)
    with pytest.raises(InferenceUnavailable, match="inference process"):
        remote.run(samples)  # the host is gone: the call fails, it does not hang
    with hosting(sock, opener) as host:
        np.testing.assert_array_equal(remote.run(samples), before)  # connected again, session opened again
        assert host.batches == 1
    remote.close()


def test_a_session_is_held_while_a_connection_holds_it(sock: Path, onnx_path: Path) -> None:
    with hosting(sock, onnx_opener(DevicePreference.CPU, 1)) as host:
        first, second = RemoteSession(sock, onnx_path), RemoteSession(sock, onnx_path)
        exact = RemoteSession(sock, onnx_path, exact_math=True)
        assert sorted(host._sessions) == [(str(onnx_path), False), (str(onnx_path), True)]
        first.close()
        exact.close()
        _until(lambda: len(host._sessions) == 1)
        second.close()
        _until(lambda: not host._sessions)


def test_no_host_and_a_file_it_cannot_open_are_said_clearly(sock: Path, tmp_path: Path, onnx_path: Path) -> None:
    with pytest.raises(InferenceUnavailable, match="not reachable"):
        RemoteSession(sock, onnx_path)
    with hosting(sock, onnx_opener(DevicePreference.CPU, 1)) as host:
        with pytest.raises(RuntimeError, match=r"could not open missing\.onnx"):
            RemoteSession(sock, tmp_path / "missing.onnx")
        assert not host._sessions


def test_a_bad_frame_drops_that_connection_only(sock: Path, onnx_path: Path, samples: NDArray[np.float32]) -> None:
    with hosting(sock, onnx_opener(DevicePreference.CPU, 1)):
        remote = RemoteSession(sock, onnx_path)
        for frame in (
            struct.pack("!IQ", 10**6, 0),  # a header over the limit
            _frame(b"[]"),  # a header that is not an object
            _frame(b'{"op":"run","dtype":"float32","shape":[1]}', b"abcd"),  # run before open
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(5)
                raw.connect(str(sock))
                raw.sendall(frame)
                answer = raw.recv(4096)
                assert answer == b"" or b"open" in answer
        assert remote.run(samples).shape[0] == len(samples)
        remote.close()


def test_an_overloaded_host_says_so(sock: Path, onnx_path: Path, samples: NDArray[np.float32]) -> None:
    def open_slow(path: Path, exact_math: bool) -> Session:
        return Slow(OnnxModel(path, device=DevicePreference.CPU), delay_s=0.2)

    with hosting(sock, open_slow, max_latency_s=0.05):
        remotes = [RemoteSession(sock, onnx_path) for _ in range(3)]
        errors: list[Exception] = []

        def call(remote: RemoteSession) -> None:
            try:
                remote.run(samples[:1])
            except Overloaded as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(r,)) for r in remotes]
        for t in threads:
            t.start()
            time.sleep(0.01)  # the first is running when the others queue behind it
        for t in threads:
            t.join(10)
        for remote in remotes:
            remote.close()
    assert errors and all("latency budget" in str(e) for e in errors)


def _until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!IQ", len(header), len(payload)) + header + payload


@pytest.mark.integration
def test_loop_serve_with_shared_inference_processes(
    start_service: Callable[..., RunningService], trained_model: BuildResult, tmp_path: Path
) -> None:
    """Two workers, two inference processes (as on a machine with two GPUs): answers are right,
    each process loads the model once and no worker loads it, and a killed inference process
    costs 503s, never a 500, until `loop serve` has started it again."""
    service = start_service(
        LOOP_INFERENCE="shared",
        LOOP_INFERENCE_PROCESSES="2",
        LOOP_WORKERS="2",
        LOOP_INFERENCE_SOCKET=str(tmp_path / "inference.sock"),
    )
    data = digits.load()

    def predict(k: int) -> httpx.Response:
        return httpx.post(f"{service.url}/predict", json={"samples": [data.images[k].tolist()]}, timeout=30)

    def hosts() -> list[psutil.Process]:
        return [p for p in psutil.Process(service.process.pid).children() if "inference" in p.cmdline()]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(predict, range(96)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    right = sum(a.json()["predictions"][0]["label"] == str(data.labels[k]) for k, a in enumerate(answers))
    assert right / len(answers) >= 0.95
    (model,) = httpx.get(f"{service.url}/models").json()["models"]
    assert model["provider"] == "CPUExecutionProvider" and model["reference"]["samples"] > 0
    # Each inference process opens the model when its first worker connects, and the second
    # worker may still be starting after the first has answered everything: wait for both.
    deadline = time.monotonic() + 60
    while (logs := service.logs()).count("INFO models.runtime: loaded") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    # The inference processes log as the command line does; the BentoML workers as BentoML does.
    assert logs.count("INFO models.runtime: loaded") == 2, logs
    assert "[models.runtime] loaded" not in logs, "a worker loaded the model itself"
    assert {p.cmdline()[-1] for p in hosts()} == {"0", "1"}
    assert (tmp_path / "inference.sock").exists() and (tmp_path / "inference-1.sock").exists()

    first = next(p for p in hosts() if p.cmdline()[-1] == "0")
    first.kill()
    statuses: list[int] = []
    deadline = time.monotonic() + 60
    while statuses[-20:].count(200) < 20:  # both workers answer again
        assert time.monotonic() < deadline, f"not answering again after an inference process died: {statuses[-5:]}"
        statuses.append(predict(len(statuses) % len(data.labels)).status_code)
        time.sleep(0.02)
    assert set(statuses) <= {200, 503}, statuses
    assert first.pid not in {p.pid for p in hosts()} and len(hosts()) == 2
