"""The naive baseline: a plain grpc.aio server calling `session.run` once per request.

What one writes first: the Open Inference Protocol's `ModelInfer` (so the same `tritonclient`
load drives it), the input scaled from UINT8 as cnnserve does, the requested outputs (or
`probabilities`) run and sent back raw, with no batching, no queue and no thread pool: the
handler runs the session on the event loop. Sessions get cnnserve's own options
(`service.runtime`), so what differs from cnnserve is the serving, not ONNX Runtime.

`python -m bench.serving.naive_server --port P [--allow-spinning] [--device cuda]
NAME=MODEL.onnx ...`;
`NaiveServer` launches it from the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.serving.processes import ServerProcess, serve_until_signalled
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc
from service.runtime import ModelRuntime, RuntimeOptions


class NaiveServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Readiness and `ModelInfer`; every other RPC is the generated UNIMPLEMENTED."""

    def __init__(self, runtimes: dict[str, ModelRuntime]) -> None:
        self.runtimes = runtimes

    async def ServerReady(self, request: Any, context: Any) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=request.name in self.runtimes)

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        runtime = self.runtimes.get(request.model_name)
        if runtime is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_name!r}")
        count = int(request.inputs[0].shape[0])
        pixels = np.frombuffer(request.raw_input_contents[0], np.uint8)
        batch = pixels.reshape(count, 1, 28, 28).astype(np.float32) / np.float32(255)
        names = [o.name for o in request.outputs] or ["probabilities"]
        values = runtime.session.run(names, {runtime.input_name: batch})
        response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, value in zip(names, values, strict=True):
            response.outputs.add(name=name, datatype="FP32", shape=value.shape)
            response.raw_output_contents.append(value.tobytes())
        return response


async def serve(port: int, runtimes: dict[str, ModelRuntime]) -> None:
    servicer = NaiveServicer(runtimes)
    await serve_until_signalled(
        port, lambda server: oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.naive_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--allow-spinning", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("models", nargs="+", help="NAME=PATH of an ONNX file")
    args = parser.parse_args(argv)
    options = RuntimeOptions(device=args.device, allow_spinning=args.allow_spinning)
    runtimes = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        runtimes[name] = ModelRuntime(Path(path), options)  # refuses a device it cannot start
        print(f"{name}: {runtimes[name].provider}", flush=True)  # into the suite's log
    asyncio.run(serve(args.port, runtimes))
    return 0


@dataclass
class NaiveServer(ServerProcess):
    """The naive baseline as a subprocess of the suite."""

    paths: dict[str, Path] = field(default_factory=dict)
    allow_spinning: bool = False
    device: str = "cpu"

    def command(self) -> list[str]:
        spin = ["--allow-spinning"] if self.allow_spinning else []
        device = ["--device", self.device] if self.device != "cpu" else []
        models = [f"{name}={path}" for name, path in self.paths.items()]
        return [sys.executable, "-m", "bench.serving.naive_server", "--port", str(self.port)] + [
            *spin,
            *device,
            *models,
        ]


if __name__ == "__main__":
    sys.exit(main())
