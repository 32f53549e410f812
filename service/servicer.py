"""cnnserve.v1.Inference: translates our messages and calls the layers below.

No ONNX Runtime here: a request is decoded (preprocess), queued on its model's batcher, and
the batcher's arrays are turned back into messages. Every error is a domain error mapped to a
status in one place (`errors.status_of`), with a message naming the field and the image index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import grpc
import numpy as np

from service import metrics, preprocess
from service.config import MiB, Settings
from service.errors import DeadlineExceeded, InvalidArgument, ServiceError, status_of
from service.proto import cnnserve_pb2 as pb
from service.proto import cnnserve_pb2_grpc as pb_grpc
from service.replies import check_reply_size
from service.repository import ModelRepository, ModelVersion, State

DEFAULT_TOP_K = 5
# Decoding moves off the event loop, to the decode threads, for more than one encoded image or
# for this many encoded bytes: the loop answers every call, and under overload it must keep
# refusing the excess at once instead of decoding PNGs while calls wait unseen in gRPC's queue.
# One small image stays on the loop: the thread hop would cost more than its decoding.
DECODE_IN_THREAD_BYTES = 256 * 1024
DECODE_IN_THREAD_IMAGES = 2
STREAM_WINDOW = 64  # stream items decoded and queued at once; more wait in gRPC flow control

INVERT = {
    pb.INVERT_AUTO: preprocess.Invert.AUTO,
    pb.INVERT_YES: preprocess.Invert.YES,
    pb.INVERT_NO: preprocess.Invert.NO,
}
FEATURE_DTYPES = {
    pb.DATA_TYPE_UNSPECIFIED: (np.dtype("<f4"), pb.DATA_TYPE_FLOAT32),
    pb.DATA_TYPE_FLOAT32: (np.dtype("<f4"), pb.DATA_TYPE_FLOAT32),
    pb.DATA_TYPE_FLOAT16: (np.dtype("<f2"), pb.DATA_TYPE_FLOAT16),
}
TENSOR_DTYPES = {
    pb.DATA_TYPE_UNSPECIFIED: "float32",
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_UINT8: "uint8",
}
STATES = {
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.FAILED: pb.MODEL_STATE_FAILED,
    State.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


class observed:  # noqa: N801 - used as a function: `with observed(...)`
    """Count a call in the metrics, in flight while it runs, then under its final status and
    duration; errors propagate. A class rather than two generator context managers: every
    call enters one, and a generator's frames cost more than two method calls."""

    __slots__ = ("method", "model", "version", "started")

    def __init__(self, method: str, model: str, version: str) -> None:
        self.method, self.model, self.version = method, model, version
        self.started = 0.0

    def __enter__(self) -> None:
        metrics.request_started(self.model, self.version)
        self.started = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        if kind is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        elif isinstance(error, ServiceError):
            code = error.code
        else:
            code = grpc.StatusCode.INTERNAL
        seconds = time.perf_counter() - self.started
        metrics.request_ended(self.model, self.version, self.method, code.name, seconds)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, for the batcher to drop late requests."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _raw_28x28(images: Any) -> list[bytes] | None:
    """Every image's bytes when all are raw pixels at the model's own size, which decode as a
    batch (no per-image checks left); None as soon as one is not. One pass over the images."""
    data = []
    for image in images:
        if image.WhichOneof("data") != "pixels":
            return None
        p = image.pixels
        if p.height != preprocess.SIZE or p.width != preprocess.SIZE:
            return None
        data.append(p.data)
    return data if set(map(len, data)) == {preprocess.SIZE**2} else None


class Images:
    """Decoding of a request's images into one N x 1 x 28 x 28 array."""

    def __init__(self, settings: Settings, decoder: Executor | None = None) -> None:
        self.limits = preprocess.Limits(max_pixels=settings.max_pixels)
        self.max_images = settings.max_images_per_request
        self.decoder = decoder  # None: asyncio's default executor

    def _one(self, image: pb.Image, index: int, invert: preprocess.Invert) -> np.ndarray:
        kind = image.WhichOneof("data")
        where = f"images[{index}]"
        try:
            if kind == "encoded":
                return preprocess.from_encoded(image.encoded, invert, self.limits)
            if kind == "pixels":
                p = image.pixels
                return preprocess.from_pixels(p.height, p.width, p.data, invert, self.limits)
            if kind == "tensor":
                t = image.tensor
                dtype = TENSOR_DTYPES.get(t.dtype, f"enum value {t.dtype}")
                return preprocess.from_tensor(list(t.shape), dtype, t.data)
        except preprocess.InvalidImage as error:
            raise InvalidArgument(f"{where}.{kind}: {error}") from None
        raise InvalidArgument(f"{where}: empty image; set one of encoded, pixels or tensor")

    def _all(self, images: Any, invert: preprocess.Invert) -> np.ndarray:
        return preprocess.stack([self._one(image, i, invert) for i, image in enumerate(images)])

    def check(self, images: Any, invert_value: int) -> preprocess.Invert:
        """The request-level checks, cheap and before any decoding; the invert mode."""
        if not images:
            raise InvalidArgument("images: at least one image is required")
        if len(images) > self.max_images:
            raise InvalidArgument(
                f"images: {len(images)} images in one request, over the limit of "
                f"{self.max_images}; split the request"
            )
        if invert_value not in INVERT:
            raise InvalidArgument(f"invert: unknown value {invert_value}")
        return INVERT[invert_value]

    async def decode(self, images: Any, invert: preprocess.Invert) -> np.ndarray:
        """The images `check` passed, as one batch (big encoded ones in the decoder threads)."""
        if len(images) > 1 and (raw := _raw_28x28(images)) is not None:
            return preprocess.from_pixel_batch(raw, invert)
        sizes = [len(image.encoded) for image in images]
        if sum(sizes) >= DECODE_IN_THREAD_BYTES or len(sizes) - sizes.count(0) >= (
            DECODE_IN_THREAD_IMAGES
        ):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.decoder, self._all, images, invert)
        return self._all(images, invert)


def add_feature_maps(
    maps: Any, outputs: dict[str, np.ndarray], names: list[str], index: int, dtype: Any, tag: int
) -> None:
    """Image `index`'s maps added in place to `maps` (a repeated FeatureMap field): a map built
    apart and then extended in is copied once more, bytes and all (feature-map overhead 0.030
    -> 0.020 ms: bench/results/changes/2026-11-27-feature-maps-in-place.json)."""
    add = maps.add
    for name in names:
        value = outputs[name][index]
        add(name=name, shape=value.shape, dtype=tag, data=value.astype(dtype, copy=False).tobytes())


def model_info(name: str, entry: ModelVersion, versions: dict[str, ModelVersion]) -> pb.ModelInfo:
    config = entry.config
    batching = entry.batcher.policy if entry.batcher else None
    accuracy = (config.get("accuracy") or {}).get("onnxruntime")
    info = pb.ModelInfo(
        name=name,
        version=entry.version,
        versions=[
            pb.VersionStatus(version=v.version, state=STATES[v.state], reason=v.reason)
            for v in sorted(versions.values(), key=lambda v: int(v.version))
        ],
        kind=entry.kind,
        summary=str(config.get("summary", "")),
        labels=entry.labels,
        input=_spec(config.get("input")),
        outputs=[_spec(o) for o in config.get("outputs", [])],
        features=[_spec(f) for f in config.get("features", [])],
        params=int(config.get("params", 0)),
        mflops=float(config.get("mflops", 0.0)),
        execution_provider=entry.provider,
        state=STATES[entry.state],
        state_reason=entry.reason,
        max_batch_size=batching.max_batch_size if batching else 0,
        max_queue_delay_ms=batching.max_queue_delay_s * 1000 if batching else 0.0,
    )
    if accuracy is not None:
        info.accuracy = float(accuracy)
    return info


def _spec(spec: dict[str, Any] | None) -> pb.TensorSpec:
    if not spec:
        return pb.TensorSpec()
    return pb.TensorSpec(name=spec["name"], shape=spec["shape"], dtype=pb.DATA_TYPE_FLOAT32)


Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


class InferenceServicer(pb_grpc.InferenceServicer):
    """Our API over the shared repository and batchers."""

    def __init__(
        self, repository: ModelRepository, settings: Settings, decoder: Executor | None = None
    ) -> None:
        self.repository = repository
        self.images = Images(settings, decoder)
        self.send_limit = settings.max_send_message_mb * MiB

    async def _observed(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, call: Handler
    ) -> Any:
        try:  # labels too: whatever fails must become a status, never UNKNOWN
            labels = self.repository.metric_labels(request.model, request.version)
            with observed(method, *labels):
                return await call(request, context)
        except Exception as error:  # noqa: BLE001 - every failure becomes a status
            await context.abort(*status_of(error))

    # Classify -----------------------------------------------------------------------------

    async def _run(
        self,
        entry: ModelVersion,
        request: pb.ClassifyRequest | pb.FeatureMapsRequest,
        features: Sequence[str],
        outputs_for: Callable[[list[str]], list[str]],
        context: grpc.aio.ServicerContext,
    ) -> tuple[ModelVersion, list[str], np.ndarray, dict[str, np.ndarray]]:
        """Admit, decode, look the version up again, queue: every request's way to a batch.

        Admission comes first, so an overloaded model refuses a call before decoding it, and a
        call whose deadline has passed is dropped before costing anything.
        """
        invert = self.images.check(request.images, request.invert)
        deadline = deadline_of(context)
        if deadline is not None and deadline <= asyncio.get_running_loop().time():
            raise DeadlineExceeded("the deadline passed before the request could start")
        assert entry.batcher is not None
        with entry.batcher.admitted(len(request.images)) as reserved:
            batch = await self.images.decode(request.images, invert)
            current, names = self._after_decoding(request.model, request.version, features)
            assert current.batcher is not None
            future = current.batcher.submit(
                batch, outputs_for(names), deadline, reserved=reserved if current is entry else 0
            )
        return current, names, batch, await future

    def _after_decoding(
        self, model: str, version: str, features: Sequence[str]
    ) -> tuple[ModelVersion, list[str]]:
        """The version to submit to, looked up again once the images are decoded.

        Decoding yields to the event loop; a version swapped in meanwhile takes the request,
        because the old one may be unloading and would refuse it. No await may come between
        this lookup and the submit, so a hot swap fails no call.
        """
        entry = self.repository.ready(model, version)
        return entry, entry.resolve_features(features, "features")

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        entry = self.repository.ready(request.model, request.version)
        if entry.kind != "classifier":
            raise InvalidArgument(
                f"model: {entry.name} is a {entry.kind} with no class output; call FeatureMaps"
            )
        features = entry.resolve_features(request.features, "features")
        if request.feature_dtype not in FEATURE_DTYPES:
            raise InvalidArgument("feature_dtype: feature maps are sent as FLOAT32 or FLOAT16")
        dtype, tag = FEATURE_DTYPES[request.feature_dtype]
        labels = entry.labels
        top_k = min(request.top_k or DEFAULT_TOP_K, len(labels))
        check_reply_size(
            entry,
            ["probabilities", *features],
            len(request.images),
            np.dtype(dtype).itemsize,
            self.send_limit,
            "features",
        )
        entry, features, batch, outputs = await self._run(
            entry, request, request.features, lambda names: ["probabilities", *names], context
        )
        probabilities = outputs["probabilities"]
        if top_k == 1:  # the usual ask: the first of the most likely, as the sort below gives
            order = probabilities.argmax(axis=1)[:, None].tolist()
        else:
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k].tolist()
        rows = probabilities.tolist()  # Python floats in one call, not one per value
        # Messages built in place: passing built ones to a constructor copies each of them.
        response = pb.ClassifyResponse(model=entry.name, version=entry.version)
        add_result = response.results.add
        for i, (row, best) in enumerate(zip(rows, order, strict=True)):
            result = add_result(probabilities=row)
            add_score = result.top_k.add
            for c in best:
                add_score(index=c, label=labels[c], probability=row[c])
            if features:
                add_feature_maps(result.features, outputs, features, i, dtype, tag)
        return response

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._observed("Classify", request, context, self._classify)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[pb.ClassifyStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Items run concurrently (so they batch); replies go out in request order.

        At most STREAM_WINDOW items are in progress: past that the reader stops reading, and
        gRPC's flow control pushes back on the client.
        """
        pending: asyncio.Queue[tuple[str, asyncio.Task[Any]] | None] = asyncio.Queue(STREAM_WINDOW)

        async def one(item: pb.ClassifyStreamRequest) -> pb.ClassifyStreamResponse:
            try:  # labels too: a failure is this item's error, not the stream's end
                labels = self.repository.metric_labels(item.request.model, item.request.version)
                with observed("ClassifyStream", *labels):
                    response = await self._classify(item.request, context)
                return pb.ClassifyStreamResponse(id=item.id, response=response)
            except Exception as error:  # noqa: BLE001 - reported on the item, stream goes on
                code, message = status_of(error)
                return pb.ClassifyStreamResponse(
                    id=item.id, error=pb.Error(code=code.value[0], message=message)
                )

        async def read() -> None:
            try:
                async for item in request_iterator:
                    await pending.put((item.id, asyncio.ensure_future(one(item))))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (entry := await pending.get()) is not None:
                yield await entry[1]
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not pending.empty():
                queued = pending.get_nowait()
                if queued is not None:
                    queued[1].cancel()

    # Feature maps -------------------------------------------------------------------------

    async def _feature_maps(
        self, request: pb.FeatureMapsRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeatureMapsResponse:
        entry = self.repository.ready(request.model, request.version)
        features = entry.resolve_features(request.features, "features") or list(entry.feature_names)
        if not features:
            raise InvalidArgument(f"model: {entry.name} has no feature outputs")
        if request.dtype not in FEATURE_DTYPES:
            raise InvalidArgument("dtype: feature maps are sent as FLOAT32 or FLOAT16")
        dtype, tag = FEATURE_DTYPES[request.dtype]
        check_reply_size(
            entry,
            features,
            len(request.images),
            np.dtype(dtype).itemsize,
            self.send_limit,
            "features",
        )
        entry, features, batch, outputs = await self._run(
            entry, request, request.features or features, list, context
        )
        response = pb.FeatureMapsResponse(model=entry.name, version=entry.version)
        for i in range(len(batch)):
            add_feature_maps(response.results.add().features, outputs, features, i, dtype, tag)
        return response

    async def FeatureMaps(
        self, request: pb.FeatureMapsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._observed("FeatureMaps", request, context, self._feature_maps)

    # Model information --------------------------------------------------------------------

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        infos = [
            model_info(name, self.repository.newest(name), versions)
            for name, versions in sorted(self.repository.models.items())
        ]
        return pb.ListModelsResponse(models=infos)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            entry = self.repository.find(request.model, request.version)
        except ServiceError as error:
            await context.abort(*status_of(error))
        return model_info(entry.name, entry, self.repository.models[entry.name])
