"""The gRPC floor: what a bare Python gRPC call costs on this machine, before any serving work.

A grpc.aio server on uvloop (the loop our own server runs on by default) that answers
`/cnnserve.v1.Inference/Classify` with bytes serialized once at start-up. The method is
registered with no deserializer and no serializer, so no protobuf work happens per call: the
handler gets the request's bytes and returns prebuilt ones. Its server CPU per call is the
part of every Python gRPC server's cost that no serving code can remove.

The reply must still pass the load client's check (one reply in 50 is parsed: as many results
as the request had images, probabilities summing to 1), so one reply is prebuilt per image
count given with `--images`. The handler picks it by the request's byte length: the first
request of a length is parsed once to count its images, and the count's reply is then cached
under that length. The suite's requests are raw 28 x 28 pixels, so every request with the
same image count has the same length and each length is parsed once; a request whose count
was not prebuilt is refused (INVALID_ARGUMENT). It also answers the Open Inference Protocol's
`ServerReady`, which is how the suite waits for a server (`processes.wait_ready`).

`python -m bench.serving.floor_server --port P --images 1,32`; `FloorServer` launches it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.serving.processes import ServerProcess, serve_until_signalled
from service import loops
from service.proto import cnnserve_pb2 as pb
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc

CLASSES = 10


def reply(images: int) -> bytes:
    """A valid `ClassifyResponse` for `images` images: uniform probabilities, one top-k entry."""
    uniform = [1 / CLASSES] * CLASSES
    result = pb.Classification(
        probabilities=uniform, top_k=[pb.ClassScore(index=0, label="0", probability=uniform[0])]
    )
    return pb.ClassifyResponse(model="floor", results=[result] * images).SerializeToString()


class Replies:
    """Prebuilt replies by image count, picked per request by its byte length."""

    def __init__(self, counts: list[int]) -> None:
        self.by_count = {n: reply(n) for n in counts}
        self.by_length: dict[int, bytes] = {}

    async def classify(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        found = self.by_length.get(len(request))
        if found is None:  # first request of this length: count its images once
            count = len(pb.ClassifyRequest.FromString(request).images)
            if count not in self.by_count:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"no reply prebuilt for {count} images"
                )
            found = self.by_length[len(request)] = self.by_count[count]
        return found


class Ready(oip_grpc.GRPCInferenceServiceServicer):
    """`ServerReady` only, for the suite's readiness poll; every other RPC is UNIMPLEMENTED."""

    async def ServerReady(self, request: Any, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)


async def serve(port: int, replies: Replies) -> None:
    classify = grpc.unary_unary_rpc_method_handler(replies.classify)  # bytes in, bytes out
    handlers = grpc.method_handlers_generic_handler("cnnserve.v1.Inference", {"Classify": classify})

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
    args = parser.parse_args(argv)
    replies = Replies([int(n) for n in args.images.split(",") if n.strip()])
    with asyncio.Runner(loop_factory=loops.factory("uvloop")) as runner:
        runner.run(serve(args.port, replies))
    return 0


@dataclass
class FloorServer(ServerProcess):
    """The gRPC floor as a subprocess of the suite."""

    images: list[int] = field(default_factory=lambda: [1])

    def command(self) -> list[str]:
        counts = ",".join(map(str, self.images))
        return [sys.executable, "-m", "bench.serving.floor_server", "--port", str(self.port)] + [
            "--images",
            counts,
        ]


if __name__ == "__main__":
    sys.exit(main())
