"""The gRPC floor: what a bare Python gRPC call costs on this machine, before any serving work.

A grpc.aio server on uvloop (the loop our own server runs on by default) that answers
`/cnnserve.v1.Inference/Classify` with bytes serialized once at start-up. The method is
registered with no deserializer and no serializer, so no protobuf work happens per call: the
handler gets the request's bytes and returns prebuilt ones. Its server CPU per call is the
part of every Python gRPC server's cost that no serving code can remove.

The reply must still pass the load client's check (one reply in 50 is parsed: as many results
as the request had images, probabilities summing to 1), so one reply is prebuilt per image
count given with `--images`, and, for each feature map given with `--feature NAME=CxHxW`,
one more per count that carries that map (zeros) for every image: the floor of a call asking
for a feature map, whose bytes no server can avoid sending. The handler picks a reply by the
request's byte length: the first request of a length is parsed once for its image count and
the feature maps it asks for, and that reply is then cached under the length. The suite's
requests are raw 28 x 28 pixels, so requests alike have the same length and each length is
parsed once; a request whose reply was not prebuilt is refused (INVALID_ARGUMENT). It also
answers the Open Inference Protocol's `ServerReady`, which is how the suite waits for a server
(`processes.wait_ready`).

`--sync-workers N` serves the same replies on the synchronous `grpc.server` with N handler
threads instead (the suite's `floor-sync`): the two floors side by side say how much of a
Python gRPC call's cost is grpc.aio's own.

`python -m bench.serving.floor_server --port P --images 1,32 [--feature NAME=CxHxW]
[--sync-workers N]`;
`FloorServer` launches it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.serving.processes import BARE_OPTIONS, ServerProcess, serve_until_signalled
from service import loops
from service.proto import cnnserve_pb2 as pb
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc

CLASSES = 10


Shapes = dict[str, tuple[int, ...]]


def reply(images: int, feature: str = "", shape: tuple[int, ...] = ()) -> bytes:
    """A valid `ClassifyResponse` for `images` images: uniform probabilities, one top-k entry,
    and the feature map `feature` of `shape` (float32 zeros) when one is named."""
    uniform = [1 / CLASSES] * CLASSES
    maps = []
    if feature:
        data = bytes(4 * math.prod(shape))
        maps = [pb.FeatureMap(name=feature, shape=shape, dtype=pb.DATA_TYPE_FLOAT32, data=data)]
    result = pb.Classification(
        probabilities=uniform,
        top_k=[pb.ClassScore(index=0, label="0", probability=uniform[0])],
        features=maps,
    )
    return pb.ClassifyResponse(model="floor", results=[result] * images).SerializeToString()


def parse_feature(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=CxHxW` as a name and a shape."""
    name, _, dims = text.partition("=")
    return name, tuple(int(d) for d in dims.split("x"))


class Replies:
    """Prebuilt replies by image count and feature map, picked per request by its byte length."""

    def __init__(self, counts: list[int], features: Shapes | None = None) -> None:
        self.by_kind = {(n, ""): reply(n) for n in counts}
        for name, shape in (features or {}).items():
            self.by_kind |= {(n, name): reply(n, name, shape) for n in counts}
        self.by_length: dict[int, bytes] = {}

    def find(self, request: bytes) -> bytes | str:
        """The reply for this request, or why there is none."""
        found = self.by_length.get(len(request))
        if found is None:  # first request of this length: read what it asks for once
            message = pb.ClassifyRequest.FromString(request)
            count, features = len(message.images), list(message.features)
            found = self.by_kind.get((count, features[0] if len(features) == 1 else ""))
            if found is None or len(features) > 1:
                return f"no reply prebuilt for {count} images and features {features}"
            self.by_length[len(request)] = found
        return found

    async def classify(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        found = self.find(request)
        if isinstance(found, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, found)
        return found

    def classify_sync(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        found = self.find(request)
        if isinstance(found, str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, found)  # raises
        return found


class Ready(oip_grpc.GRPCInferenceServiceServicer):
    """`ServerReady` only, for the suite's readiness poll; every other RPC is UNIMPLEMENTED."""

    async def ServerReady(self, request: Any, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)


def classify_handler(classify: Any) -> grpc.GenericRpcHandler:
    """`Classify` on either server kind, bytes in and bytes out (no protobuf work per call)."""
    method = grpc.unary_unary_rpc_method_handler(classify)
    return grpc.method_handlers_generic_handler("cnnserve.v1.Inference", {"Classify": method})


class SyncReady(oip_grpc.GRPCInferenceServiceServicer):
    """`Ready` for the synchronous server, whose handlers are plain functions."""

    def ServerReady(self, request: Any, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)


def serve_sync(port: int, replies: Replies, workers: int) -> None:
    """The same replies on the synchronous `grpc.server`, its handlers on `workers` threads:
    how much of the floor is grpc.aio's own, measured beside it."""
    server = grpc.server(ThreadPoolExecutor(workers), options=BARE_OPTIONS)
    server.add_generic_rpc_handlers((classify_handler(replies.classify_sync),))
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(SyncReady(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


async def serve(port: int, replies: Replies) -> None:
    handlers = classify_handler(replies.classify)

    def add(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((handlers,))
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(Ready(), server)

    await serve_until_signalled(port, add)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.floor_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--images", default="1", help="comma-separated image counts to prebuild replies for"
    )
    parser.add_argument(
        "--sync-workers",
        type=int,
        default=0,
        help="serve on the synchronous grpc.server with this many handler threads (0: grpc.aio)",
    )
    parser.add_argument(
        "--feature",
        action="append",
        default=[],
        help="NAME=CxHxW: also prebuild replies carrying this float32 feature map per image",
    )
    args = parser.parse_args(argv)
    features = dict(parse_feature(text) for text in args.feature)
    replies = Replies([int(n) for n in args.images.split(",") if n.strip()], features)
    if args.sync_workers:
        serve_sync(args.port, replies, args.sync_workers)
        return 0
    with asyncio.Runner(loop_factory=loops.factory("uvloop")) as runner:
        runner.run(serve(args.port, replies))
    return 0


@dataclass
class FloorServer(ServerProcess):
    """The gRPC floor as a subprocess of the suite."""

    images: list[int] = field(default_factory=lambda: [1])
    sync_workers: int = 0  # > 0: the synchronous grpc.server with this many threads
    features: Shapes = field(default_factory=dict)  # feature maps to prebuild replies with

    def command(self) -> list[str]:
        counts = ",".join(map(str, self.images))
        maps = [f"--feature={n}={'x'.join(map(str, s))}" for n, s in self.features.items()]
        return [sys.executable, "-m", "bench.serving.floor_server", "--port", str(self.port)] + [
            "--images",
            counts,
            "--sync-workers",
            str(self.sync_workers),
            *maps,
        ]


if __name__ == "__main__":
    sys.exit(main())
