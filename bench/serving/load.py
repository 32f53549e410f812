"""The load process: closed-loop clients in a separate (spawned) process, one record per call.

`concurrency` workers each send their next call the moment the last one ends, for `seconds`.
Two clients: `grpc` sends pre-serialized `cnnserve.v1` requests through a bare grpc.aio
method (no per-call protobuf work), and `tritonclient` calls `InferenceServerClient.infer` of
the stock `tritonclient.grpc.aio`, on inputs whose data is set once, so every Open Inference
Protocol server (ours, Triton, the naive one) gets the very same client. Both are lean: no
per-call task or timer beyond the call's own deadline, replies parsed one in `check_every`.
The records and the process handling are bench/reliability's (`run_in_process`), so the
client's CPU time comes back with them: it shares the cores with the server.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.reliability.load import CHANNEL_OPTIONS, Records, run_in_process, save_records

CALLS_PER_CHANNEL = 32  # above this a channel's one connection starts to queue calls
LIMIT_GRACE_S = 120


@dataclass(frozen=True)
class Load:
    """One closed-loop run against one server."""

    address: str
    client: str  # grpc | tritonclient
    concurrency: int
    seconds: float
    timeout: float  # every call's deadline, seconds
    images: int  # per request
    method: str = ""  # grpc: the full method name
    payloads: tuple[bytes, ...] = ()  # grpc: serialized requests, payload i of kind i % kinds
    model: str = ""  # tritonclient: the model to call
    arrays: tuple[np.ndarray, ...] = ()  # tritonclient: uint8 N x 28 x 28 inputs
    outputs: tuple[tuple[str, ...], ...] = ()  # tritonclient: the outputs of each kind of call
    kinds: int = 1  # each worker's calls take the kinds in turn; the record says which
    check_every: int = 50


def _classify_ok(reply: bytes, images: int) -> bool:
    from service.proto import cnnserve_pb2 as pb

    message = pb.ClassifyResponse.FromString(reply)
    return len(message.results) == images and all(
        abs(sum(r.probabilities) - 1) < 1e-3 for r in message.results
    )


def _status_value(error: Exception) -> int:
    """A tritonclient error's gRPC status code value (UNKNOWN when it names none)."""
    text = str(getattr(error, "status", lambda: "")() or "")
    name = text.rsplit(".", 1)[-1]
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    return int(code.value[0])


class _Loop:
    def __init__(self, load: Load) -> None:
        self.load = load
        self.rows: list[tuple[float, float, int, int]] = []
        self.checked = self.wrong = 0
        self.began = self.ended = 0.0

    def record(self, started: float, turn: int, code: int) -> bool:
        """Keep the call's row; whether this reply is one to check."""
        self.rows.append((started, time.monotonic() - started, turn % self.load.kinds, code))
        return code == 0 and len(self.rows) % self.load.check_every == 0

    async def run(self) -> None:
        width = max(1, self.load.concurrency // CALLS_PER_CHANNEL)
        if self.load.client == "grpc":
            await self._grpc(width)
        else:
            await self._tritonclient(width)

    async def _workers(self, one: Any) -> None:
        self.began = time.monotonic()
        end = self.began + self.load.seconds

        async def worker(n: int) -> None:
            turn = n
            while time.monotonic() < end:
                await one(n, turn)
                turn += 1

        await asyncio.gather(*(worker(n) for n in range(self.load.concurrency)))
        self.ended = time.monotonic()

    async def _grpc(self, width: int) -> None:
        load = self.load
        channels = [grpc.aio.insecure_channel(load.address, CHANNEL_OPTIONS) for _ in range(width)]
        methods = [channel.unary_unary(load.method) for channel in channels]
        for channel in channels:
            await channel.channel_ready()

        async def one(n: int, turn: int) -> None:
            payload = load.payloads[turn % len(load.payloads)]
            started = time.monotonic()
            try:
                reply = await methods[n % width](payload, timeout=load.timeout)
                code = 0
            except grpc.aio.AioRpcError as error:
                reply, code = b"", int(error.code().value[0])
            if self.record(started, turn, code):
                self.checked += 1
                self.wrong += not _classify_ok(reply, load.images)

        await self._workers(one)
        for channel in channels:
            await channel.close()

    async def _tritonclient(self, width: int) -> None:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.grpc.aio import InferenceServerClient
        from tritonclient.utils import InferenceServerException

        load = self.load
        clients = [
            InferenceServerClient(load.address, channel_args=CHANNEL_OPTIONS) for _ in range(width)
        ]
        inputs = []
        for array in load.arrays:
            tensor = InferInput("image", list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array)
            inputs.append([tensor])
        outputs = [[InferRequestedOutput(name) for name in names] for names in load.outputs]
        for client in clients:
            await client.is_server_ready()  # connects, outside the measured time

        async def one(n: int, turn: int) -> None:
            started = time.monotonic()
            try:
                result = await clients[n % width].infer(
                    load.model,
                    inputs[turn % len(inputs)],
                    outputs=outputs[turn % load.kinds],
                    client_timeout=load.timeout,
                )
                code = 0
            except InferenceServerException as error:
                result, code = None, _status_value(error)
            if self.record(started, turn, code):
                self.checked += 1
                probabilities = result.as_numpy("probabilities")
                self.wrong += probabilities is None or probabilities.shape != (load.images, 10)

        await self._workers(one)
        for client in clients:
            await client.close()


def _main(load: Load, out: str) -> None:
    loop = _Loop(load)
    asyncio.run(loop.run())
    save_records(
        out, loop.rows, began=loop.began, ended=loop.ended, checked=loop.checked, wrong=loop.wrong
    )


def run(load: Load, workdir: Path) -> Records:
    """Run `load` in a fresh spawned process and read back its records."""
    workdir.mkdir(parents=True, exist_ok=True)
    return run_in_process(_main, load, load.seconds + load.timeout + LIMIT_GRACE_S, workdir)
