"""`loop engine`: an Open Inference Protocol engine serving a Triton model repository, over HTTP
and gRPC, for services with `LOOP_INFERENCE=remote` where no Triton runs.

It serves what Triton serves from the same repository (`loop models export-triton` writes it): each
`<name>/<n>/model.onnx` as version n of `name`, raw graph in and raw graph out (the pre-processed
tensor in, the graph's output back, no scoring, nothing stored: the calling service logs). Versions
open on first use, each with its own adaptive batcher, so a call naming a version exported after the
engine started finds it; `POST /v2/repository/models/{name}/load` forgets the versions no longer on
disk and opens the newest, `.../unload` closes them all.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.provenance import code_version
from models.runtime import DevicePreference, OnnxModel
from models.triton import Tensor, graph_io
from service.batching import AdaptiveBatcher
from service.routes import v2

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class EngineError(Exception):
    """A call the engine refuses: `status` is its HTTP status (gRPC maps it to a code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Version:
    number: int
    session: OnnxModel
    batcher: AdaptiveBatcher[None]
    input: Tensor
    output: Tensor


class Repository:
    """The versions of a model repository folder, opened on first use."""

    def __init__(
        self, root: Path, *, device: DevicePreference, ort_threads: int, max_batch_size: int, max_latency_s: float
    ) -> None:
        self.root = root
        self.device = device
        self.ort_threads = ort_threads
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self._open: dict[tuple[str, int], _Version] = {}
        self._opening = asyncio.Lock()

    def numbers(self, name: str) -> list[int]:
        """The versions of `name` on disk, oldest first."""
        folder = self.root / name
        if "/" in name or name.startswith(".") or not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file())

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if self.numbers(p.name)) if self.root.is_dir() else []

    async def version(self, name: str, number: str | None) -> _Version:
        """Version `number` of `name` (the newest when None), opened if it is not yet. A named version
        that is open is answered without looking at the disk (the path of every call)."""
        if number is not None and number.isdigit() and (found := self._open.get((name, int(number)))) is not None:
            return found
        numbers = self.numbers(name)
        if not numbers:
            raise EngineError(
                404, f"unknown model {name!r}; the repository holds: {', '.join(self.models()) or 'none'}"
            )
        if number is not None and (not number.isdigit() or int(number) not in numbers):
            raise EngineError(404, f"model {name!r} has no version {number!r}; it has {numbers}")
        wanted = int(number) if number is not None else numbers[-1]
        async with self._opening:
            found = self._open.get((name, wanted))
            if found is None:
                found = self._open[(name, wanted)] = await asyncio.to_thread(self._load, name, wanted)
        return found

    def _load(self, name: str, number: int) -> _Version:
        path = self.root / name / str(number) / MODEL_FILE
        try:
            tensor_in, tensor_out = graph_io(path)
            session = OnnxModel(path, device=self.device, intra_op_threads=self.ort_threads)
        except Exception as exc:
            raise EngineError(400, f"{name} version {number} does not open: {exc}") from exc
        batcher: AdaptiveBatcher[None] = AdaptiveBatcher(
            lambda batch: (session.run(batch), None),
            max_batch_size=self.max_batch_size,
            max_latency_s=self.max_latency_s,
        )
        logger.info("opened %s version %d on %s", name, number, session.provider)
        return _Version(number, session, batcher, tensor_in, tensor_out)

    async def infer(self, name: str, version: _Version, tensor_name: str, array: NDArray[Any]) -> NDArray[np.float32]:
        """Run one input through an open version of `name`: its outputs."""
        expected, dims = version.input[0], version.input[2]
        if tensor_name != expected:
            raise EngineError(400, f"{name} takes one input named {expected!r}, got {tensor_name!r}")
        if array.ndim != len(dims) + 1 or any(d not in (-1, n) for d, n in zip(dims, array.shape[1:], strict=True)):
            raise EngineError(
                400, f"input {expected!r} has dims [-1, {', '.join(map(str, dims))}], got {list(array.shape)}"
            )
        if len(array) > self.max_batch_size:
            raise EngineError(400, f"a batch of {len(array)} is more than max_batch_size {self.max_batch_size}")
        try:
            outputs, _ = await version.batcher.submit(np.ascontiguousarray(array, dtype=np.float32))
        except Exception as exc:
            raise EngineError(503, f"{name} version {version.number} failed: {exc}") from exc
        return outputs

    def metadata(self, name: str, version: _Version) -> dict[str, Any]:
        def tensor(t: Tensor) -> dict[str, Any]:
            return {"name": t[0], "datatype": t[1].removeprefix("TYPE_"), "shape": [-1, *t[2]]}

        return {
            "name": name,
            "versions": [str(n) for n in self.numbers(name)],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor(version.input)],
            "outputs": [tensor(version.output)],
        }

    async def load(self, name: str) -> None:
        """Forget the versions no longer on disk, open the newest."""
        if not self.numbers(name):
            raise EngineError(400, f"the repository has no versions of {name!r} (in {self.root / name})")
        await self._close(name, keep=set(self.numbers(name)))
        await self.version(name, None)

    async def unload(self, name: str) -> None:
        await self._close(name, keep=set())

    async def _close(self, name: str, *, keep: set[int]) -> None:
        async with self._opening:
            gone = [key for key in self._open if key[0] == name and key[1] not in keep]
            closing = [self._open.pop(key) for key in gone]
        for version in closing:
            await version.batcher.close()
            version.session.close()
            logger.info("closed %s version %d", name, version.number)

    async def close(self) -> None:
        for name in {key[0] for key in self._open}:
            await self.unload(name)

    def index(self) -> list[dict[str, str]]:
        opened = set(self._open)
        return [
            {"name": name, "version": str(n), "state": "READY" if (name, n) in opened else "UNAVAILABLE"}
            for name in self.models()
            for n in self.numbers(name)
        ]


def server_metadata() -> dict[str, Any]:
    return {"name": "loop-engine", "version": code_version(), "extensions": ["binary_tensor_data", "model_repository"]}


def as_float(tensor: v2.Tensor) -> NDArray[Any]:
    """A numeric input tensor's values, or the refusal of any other."""
    if not isinstance(tensor.values, np.ndarray) or tensor.datatype in ("BYTES", "BOOL"):
        raise EngineError(400, f"input {tensor.name!r} must be numbers (FP32), not {tensor.datatype}")
    return tensor.values


# The HTTP face (REST, with the binary tensor data extension).


def http_app(repository: Repository) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def ok(_: Request) -> Response:
        return Response(status_code=200)

    def server(_: Request) -> Response:
        return JSONResponse(server_metadata())

    async def model(request: Request) -> Response:
        name, number = request.path_params["name"], request.path_params.get("version")
        return JSONResponse(repository.metadata(name, await repository.version(name, number)))

    async def ready(request: Request) -> Response:
        await repository.version(request.path_params["name"], request.path_params.get("version"))
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        name, number = request.path_params["name"], request.path_params.get("version")
        version = await repository.version(name, number)
        output = version.output
        parsed = v2.parse(
            await request.body(), request.headers.get("inference-header-content-length"), known=[output[0]]
        )
        if len(parsed.inputs) != 1:
            raise EngineError(400, f"{name} takes one input, got {len(parsed.inputs)}")
        given = parsed.inputs[0]
        outputs = await repository.infer(name, version, given.name, as_float(given))
        values = {output[0]: ("FP32", list(outputs.shape), outputs.tolist(), outputs.astype("<f4").tobytes())}
        content, length = v2.encode(parsed, {"model_name": name, "model_version": str(version.number)}, values)
        if length is None:
            return Response(content, media_type="application/json")
        headers = {"Inference-Header-Content-Length": str(length)}
        return Response(content, media_type="application/octet-stream", headers=headers)

    async def index(_: Request) -> Response:
        return JSONResponse(repository.index())

    async def load(request: Request) -> Response:
        await repository.load(request.path_params["name"])
        return Response(status_code=200)

    async def unload(request: Request) -> Response:
        await repository.unload(request.path_params["name"])
        return Response(status_code=200)

    def refused(_: Request, exc: Exception) -> Response:
        status = exc.status if isinstance(exc, EngineError) else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    routes = [
        Route("/v2", server),
        Route("/v2/health/live", ok),
        Route("/v2/health/ready", ok),
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
        *(Route(path, model) for path in model_paths),
        *(Route(path + "/ready", ready) for path in model_paths),
        *(Route(path + "/infer", infer, methods=["POST"]) for path in model_paths),
    ]
    return Starlette(routes=routes, exception_handlers={EngineError: refused, v2.ProtocolError: refused})


# The gRPC face (the protocol's GRPCInferenceService, with the stubs Triton's client ships).


def grpc_servicer(repository: Repository) -> Any:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}

    async def guarded(context: Any, work: Any) -> Any:
        try:
            return await work
        except EngineError as exc:
            await context.abort(codes.get(exc.status, grpc.StatusCode.INTERNAL), str(exc))

    def metadata(t: Tensor) -> Any:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=t[0], datatype=t[1].removeprefix("TYPE_"), shape=[-1, *t[2]]
        )

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's names)
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerReadyResponse(ready=True)

        async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerMetadataResponse(**server_metadata())

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            try:
                await repository.version(request.name, request.version or None)
            except EngineError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            version = await guarded(context, repository.version(request.name, request.version or None))
            described = repository.metadata(request.name, version)
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=described["versions"],
                platform=described["platform"],
                inputs=[metadata(version.input)],
                outputs=[metadata(version.output)],
            )

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            array = await guarded(context, _grpc_input(request))
            version = await guarded(context, repository.version(request.model_name, request.model_version or None))
            outputs = await guarded(
                context, repository.infer(request.model_name, version, request.inputs[0].name, array)
            )
            output = version.output
            answer = pb.ModelInferResponse.InferOutputTensor(name=output[0], datatype="FP32", shape=list(outputs.shape))
            return pb.ModelInferResponse(
                model_name=request.model_name,
                model_version=str(version.number),
                id=request.id,
                outputs=[answer],
                raw_output_contents=[outputs.astype("<f4").tobytes()],
            )

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:  # noqa: N802
            await guarded(context, repository.load(request.model_name))
            return pb.RepositoryModelLoadResponse()

        async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:  # noqa: N802
            await guarded(context, repository.unload(request.model_name))
            return pb.RepositoryModelUnloadResponse()

    return Servicer(), service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server


async def _grpc_input(request: Any) -> NDArray[Any]:
    """A gRPC request's one FP32 input, from its raw contents or its typed ones."""
    if len(request.inputs) != 1:
        raise EngineError(400, f"{request.model_name} takes one input, got {len(request.inputs)}")
    given = request.inputs[0]
    if given.datatype != "FP32":
        raise EngineError(400, f"input {given.name!r} must be FP32, got {given.datatype}")
    shape = [int(d) for d in given.shape]
    if request.raw_input_contents:
        values = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
    else:
        values = np.asarray(given.contents.fp32_contents, dtype=np.float32)
    if values.size != int(np.prod(shape)):
        raise EngineError(
            400, f"input {given.name!r} of shape {shape} holds {int(np.prod(shape))} values, got {values.size}"
        )
    return values.reshape(shape)


def run(repository: Repository, *, host: str, port: int, grpc_port: int | None) -> None:
    """Serve HTTP on `port` (and gRPC on `grpc_port`) until SIGTERM or SIGINT."""
    import uvicorn

    async def main() -> None:
        server = uvicorn.Server(uvicorn.Config(http_app(repository), host=host, port=port, log_level="warning"))
        grpc_server = None
        if grpc_port is not None:
            import grpc

            grpc_server = grpc.aio.server()
            servicer, add = grpc_servicer(repository)
            add(servicer, grpc_server)
            grpc_server.add_insecure_port(f"{host}:{grpc_port}")
            await grpc_server.start()
        logger.info(
            "engine serving %s on http://%s:%d%s",
            repository.root,
            host,
            port,
            f" and grpc://{host}:{grpc_port}" if grpc_port else "",
        )
        try:
            await server.serve()
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await repository.close()

    asyncio.run(main())
