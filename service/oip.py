"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) beside cnnserve.v1.

Stock clients such as tritonclient.grpc work unchanged against it. Like
`servicer.py` it only translates: a request's input tensor is checked as one batch
(`preprocess.from_batch`), queued on the model's batcher with its priority and deadline, and the
outputs go back as little-endian raw bytes, one `raw_output_contents` entry per output in the
order of `outputs` (the order tritonclient's `as_numpy` reads them in). Both APIs share the
repository, the batchers and the metrics, so their requests batch together.

Status codes follow Triton's: an unknown model or version is NOT_FOUND; a version that is not
ready is UNAVAILABLE with the reason (Triton says NOT_FOUND "has no available versions" when no
version of a model is ready; we keep UNAVAILABLE, as our own API does, since a retry can
succeed); a bad input, output or parameter is INVALID_ARGUMENT naming it; loading or unloading a
name the repository does not hold is INVALID_ARGUMENT (Triton's "failed to poll" and "has not
been served"); what cnnserve does not have (shared memory, tracing, log settings, named
repositories, config overrides) is UNIMPLEMENTED. A full queue is RESOURCE_EXHAUSTED, and a
deadline or `timeout` that passes while the request waits is DEADLINE_EXCEEDED, as in our API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import numpy as np

import service
from service import metrics, preprocess
from service.config import MiB, Settings
from service.errors import (
    InvalidArgument,
    ServiceError,
    Unavailable,
    Unimplemented,
    grpc_errors,
    status_of,
)
from service.oip_tensors import (
    Requested,
    Tensor,
    classification,
    integer_parameter,
    model_input,
    model_outputs,
)
from service.proto import grpc_service_pb2 as pb
from service.proto import grpc_service_pb2_grpc as pb_grpc
from service.replies import check_reply_size
from service.repository import ModelRepository, ModelVersion, State
from service.runtime import CUDA
from service.servicer import STREAM_WINDOW, deadline_of, observed

SERVER_NAME = "cnnserve"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
# Only what works. schedule_policy: the `priority` and `timeout` request parameters.
EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "schedule_policy",
    "statistics",
)
CONFIG_TYPES = {"FP32": pb.TYPE_FP32, "FP16": pb.TYPE_FP16, "UINT8": pb.TYPE_UINT8}
INDEX_STATES = {State.LOADING: "LOADING", State.READY: "READY"}  # others: UNAVAILABLE
SHARED_MEMORY = "shared_memory_region"
NO_SHARED_MEMORY = "shared memory is not supported by cnnserve; send tensors as raw contents"


def _unsupported(feature: str) -> Any:
    """An RPC cnnserve declares but does not implement: UNIMPLEMENTED, saying what is missing.

    The generated base class answers UNIMPLEMENTED too, but its message names a Python
    exception rather than the missing feature.
    """

    @grpc_errors
    async def method(self: Any, request: Any, context: Any) -> Any:
        raise Unimplemented(f"{feature} is not supported by cnnserve")

    return method


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol over the shared repository and batchers."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.max_images = settings.max_images_per_request
        self.send_limit = settings.max_send_message_mb * MiB

    def _described(self, name: str, version: str) -> ModelVersion:
        """A version whose model.json was read: metadata needs no loaded session."""
        entry = self.repository.find(name, version)
        if not entry.config:
            raise Unavailable(f"model {name} version {entry.version} is failed: {entry.reason}")
        return entry

    # Health and metadata ------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.repository.all_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        """Never an error, as in Triton: an unknown model is simply not ready."""
        try:
            self.repository.ready(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=service.__version__, extensions=EXTENSIONS
        )

    @grpc_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        entry = self._described(request.name, request.version)
        versions = sorted(self.repository.models[entry.name].values(), key=lambda v: int(v.version))

        def metadata(tensor: Tensor) -> pb.ModelMetadataResponse.TensorMetadata:
            return pb.ModelMetadataResponse.TensorMetadata(
                name=tensor.name, datatype=tensor.datatype, shape=[-1, *tensor.shape]
            )

        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=[v.version for v in versions if v.state is State.READY],
            platform=PLATFORM,
            inputs=[metadata(model_input(entry))],
            outputs=[metadata(o) for o in model_outputs(entry)],
        )

    @grpc_errors
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Any:
        entry = self._described(request.name, request.version)
        policy = self.repository.batch_policy(entry)
        image = model_input(entry)
        config = pb.ModelConfig(
            name=entry.name,
            platform=PLATFORM,
            backend=BACKEND,
            version_policy=pb.ModelVersionPolicy(
                latest=pb.ModelVersionPolicy.Latest(num_versions=1)
            ),
            max_batch_size=policy.max_batch_size,
            input=[
                pb.ModelInput(
                    name=image.name,
                    data_type=CONFIG_TYPES[image.datatype],
                    format=pb.ModelInput.FORMAT_NCHW,
                    dims=image.shape,
                )
            ],
            output=[
                pb.ModelOutput(name=o.name, data_type=CONFIG_TYPES[o.datatype], dims=o.shape)
                for o in model_outputs(entry)
            ],
            default_model_filename=entry.path.name,
            dynamic_batching=pb.ModelDynamicBatching(
                max_queue_delay_microseconds=round(policy.max_queue_delay_s * 1e6)
            ),
            parameters={"kind": pb.ModelParameter(string_value=entry.kind)},
        )
        if entry.provider:  # loaded: where it really runs
            gpu = entry.provider == CUDA
            kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
            config.instance_group.add(name=entry.name, count=1, kind=kind)
        return pb.ModelConfigResponse(config=config)

    # Inference ----------------------------------------------------------------------------

    def _requested(self, entry: ModelVersion, outputs: Any) -> list[Requested]:
        """Outputs by exact name, or the model's defaults; a bad one lists the valid names."""
        valid = entry.output_names
        if not outputs:
            defaults = entry.config.get("default_outputs") or valid
            return [Requested(name) for name in defaults]
        requested = []
        for index, output in enumerate(outputs):
            if output.name not in valid:
                raise InvalidArgument(
                    f"outputs[{index}]: unexpected inference output {output.name[:80]!r} for "
                    f"model {entry.name!r}; valid: {', '.join(valid)}"
                )
            if SHARED_MEMORY in output.parameters:
                raise Unimplemented(f"outputs[{index}] ({output.name}): {NO_SHARED_MEMORY}")
            classes = 0
            if "classification" in output.parameters:
                where = f"outputs[{index}] ({output.name}) parameter 'classification'"
                classes = integer_parameter(output.parameters["classification"], where)
                if classes < 1:
                    raise InvalidArgument(f"{where}: the number of classes must be >= 1")
            requested.append(Requested(output.name, classes))
        return requested

    def _schedule(
        self, parameters: Mapping[str, pb.InferParameter], context: grpc.aio.ServicerContext
    ) -> tuple[int, float | None]:
        """Priority (1 is the highest; 0 the default) and the deadline, on the loop's clock.

        `timeout` (microseconds; 0 means none) tightens the call's own gRPC deadline.
        """
        sequence = parameters.get("sequence_id")
        if sequence is not None and (sequence.int64_param or sequence.string_param):
            raise InvalidArgument("parameters['sequence_id']: cnnserve models are stateless")
        priority = 0
        if "priority" in parameters:
            priority = integer_parameter(parameters["priority"], "parameters['priority']")
        deadline = deadline_of(context)
        if "timeout" in parameters:
            timeout_us = integer_parameter(parameters["timeout"], "parameters['timeout']")
            if timeout_us:
                limit = asyncio.get_running_loop().time() + timeout_us / 1e6
                deadline = limit if deadline is None else min(deadline, limit)
        return priority, deadline

    def _batch(self, entry: ModelVersion, request: pb.ModelInferRequest) -> np.ndarray:
        """The single input tensor as an N x 1 x 28 x 28 float32 batch."""
        expected = model_input(entry).name
        if len(request.inputs) != 1:
            raise InvalidArgument(
                f"inputs: expected 1 input ({expected!r}) but got {len(request.inputs)} "
                f"for model {entry.name!r}"
            )
        tensor = request.inputs[0]
        if tensor.name != expected:
            raise InvalidArgument(
                f"inputs[0]: unexpected inference input {tensor.name[:80]!r} for model "
                f"{entry.name!r}; expected {expected!r}"
            )
        where = f"input {expected!r}"
        if SHARED_MEMORY in tensor.parameters:
            raise Unimplemented(f"{where}: {NO_SHARED_MEMORY}")
        dims = list(tensor.shape)
        if dims and dims[0] > self.max_images:
            raise InvalidArgument(
                f"{where}: {dims[0]} images in one request, over the limit of "
                f"{self.max_images}; split the request"
            )
        try:
            return preprocess.from_batch(dims, tensor.datatype, self._data(request, where))
        except preprocess.InvalidImage as error:
            raise InvalidArgument(f"{where}: {error}") from None

    @staticmethod
    def _data(request: pb.ModelInferRequest, where: str) -> bytes:
        """The input's bytes: raw (what stock clients send), or typed contents made raw."""
        tensor = request.inputs[0]
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument(
                    f"raw_input_contents: {len(request.raw_input_contents)} entries for 1 input"
                )
            if tensor.HasField("contents"):
                raise InvalidArgument(f"{where}: data in both contents and raw_input_contents")
            return request.raw_input_contents[0]
        contents = tensor.contents
        if tensor.datatype == "FP32":
            return np.array(contents.fp32_contents, dtype="<f4").tobytes()
        if tensor.datatype == "UINT8":
            values = np.array(contents.uint_contents, dtype=np.uint32)
            if values.size and int(values.max()) > 255:
                raise InvalidArgument(f"{where}: contents.uint_contents has values over 255")
            return values.astype(np.uint8).tobytes()
        if tensor.datatype == "FP16":
            raise InvalidArgument(f"{where}: FP16 data must come in raw_input_contents")
        return b""  # any other datatype is refused by name below

    def _response(
        self,
        entry: ModelVersion,
        request_id: str,
        requested: list[Requested],
        values: dict[str, np.ndarray],
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(
            model_name=entry.name, model_version=entry.version, id=request_id
        )
        for output in requested:
            value = values[output.name]
            if output.classes:
                labels = [] if output.name in entry.feature_names else entry.labels
                data, k = classification(value, output.classes, labels)
                response.outputs.add(name=output.name, datatype="BYTES", shape=[len(value), k])
            else:
                data = np.ascontiguousarray(value, dtype="<f4").tobytes()
                response.outputs.add(name=output.name, datatype="FP32", shape=value.shape)
            response.raw_output_contents.append(data)
        return response

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        entry = self.repository.ready(request.model_name, request.model_version)
        requested = self._requested(entry, request.outputs)
        priority, deadline = self._schedule(request.parameters, context)
        batch = self._batch(entry, request)
        names = list(dict.fromkeys(output.name for output in requested))
        check_reply_size(entry, names, len(batch), 4, self.send_limit, "outputs")
        assert entry.batcher is not None
        values = await entry.batcher.submit(batch, names, deadline, priority)
        return self._response(entry, request.id, requested, values)

    async def _observed(
        self, method: str, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """`_infer`, counted in the metrics under `method` with its status; errors propagate."""
        labels = self.repository.metric_labels(request.model_name, request.model_version)
        with observed(method, *labels):
            return await self._infer(request, context)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        try:
            return await self._observed("ModelInfer", request, context)
        except Exception as error:  # noqa: BLE001 - every failure becomes a status
            await context.abort(*status_of(error))

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they batch); responses go out in request order.

        A failing request answers with `error_message` and the stream goes on. At most
        STREAM_WINDOW requests are in progress; past that gRPC flow control holds the client.
        """
        pending: asyncio.Queue[asyncio.Task[Any] | None] = asyncio.Queue(STREAM_WINDOW)

        async def one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                response = await self._observed("ModelStreamInfer", request, context)
            except Exception as error:  # noqa: BLE001 - reported in the stream, which goes on
                return pb.ModelStreamInferResponse(error_message=status_of(error)[1])
            return pb.ModelStreamInferResponse(infer_response=response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.ensure_future(one(request)))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not pending.empty():
                queued = pending.get_nowait()
                if queued is not None:
                    queued.cancel()

    # Statistics and the repository --------------------------------------------------------

    @staticmethod
    def _statistics(entry: ModelVersion) -> pb.ModelStatistics:
        """Read from the same table as the nv_* metrics, so the two always agree."""
        numbers = metrics.statistics(entry.name, entry.version)
        return pb.ModelStatistics(
            name=entry.name,
            version=entry.version,
            last_inference=numbers["last_inference"],
            inference_count=numbers["inference_count"],
            execution_count=numbers["execution_count"],
            inference_stats=pb.InferStatistics(
                success=pb.StatisticDuration(**numbers["success"]),
                fail=pb.StatisticDuration(**numbers["fail"]),
                queue=pb.StatisticDuration(**numbers["queue"]),
                compute_infer=pb.StatisticDuration(**numbers["compute_infer"]),
            ),
        )

    @grpc_errors
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Any:
        """One version, a model's ready versions (or its newest), or every ready model."""
        if request.name and request.version:
            entries = [self.repository.find(request.name, request.version)]
        elif request.name:
            newest = self.repository.find(request.name)
            versions = self.repository.models[newest.name].values()
            entries = [v for v in versions if v.state is State.READY] or [newest]
        else:
            entries = [
                v
                for _, versions in sorted(self.repository.models.items())
                for v in versions.values()
                if v.state is State.READY
            ]
        entries.sort(key=lambda v: (v.name, int(v.version)))
        return pb.ModelStatisticsResponse(model_stats=[self._statistics(e) for e in entries])

    @staticmethod
    def _one_repository(name: str) -> None:
        if name:
            raise Unimplemented(
                f"repository_name {name[:80]!r}: cnnserve serves a single model repository; "
                "leave it empty"
            )

    @grpc_errors
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:
        self._one_repository(request.repository_name)
        response = pb.RepositoryIndexResponse()
        for name, versions in sorted(self.repository.models.items()):
            for entry in sorted(versions.values(), key=lambda v: int(v.version)):
                if request.ready and entry.state is not State.READY:
                    continue
                reason = entry.reason
                if entry.state is State.UNLOADED and not reason:
                    reason = "unloaded"
                response.models.add(
                    name=name,
                    version=entry.version,
                    state=INDEX_STATES.get(entry.state, "UNAVAILABLE"),
                    reason=reason,
                )
        return response

    @grpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> Any:
        """Rescan the repository, then load the model's newest version (a no-op when ready)."""
        self._one_repository(request.repository_name)
        overrides = [k for k in request.parameters if k == "config" or k.startswith("file:")]
        if overrides:
            raise Unimplemented(
                f"parameters {', '.join(overrides)}: loading with a config or file override is "
                "not supported; put the model in the repository"
            )
        await self.repository.load_newest(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> Any:
        """Accepted requests finish first; new ones get UNAVAILABLE until the model is loaded."""
        self._one_repository(request.repository_name)
        await self.repository.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # Declared by the protocol, not implemented ----------------------------------------------

    SystemSharedMemoryStatus = _unsupported("system shared memory")
    SystemSharedMemoryRegister = _unsupported("system shared memory")
    SystemSharedMemoryUnregister = _unsupported("system shared memory")
    CudaSharedMemoryStatus = _unsupported("CUDA shared memory")
    CudaSharedMemoryRegister = _unsupported("CUDA shared memory")
    CudaSharedMemoryUnregister = _unsupported("CUDA shared memory")
    TraceSetting = _unsupported("tracing")
    LogSettings = _unsupported("changing log settings")
