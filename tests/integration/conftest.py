"""A real server on a free loopback port, started in-process on its own event loop thread.

Tests talk to it with the ordinary synchronous gRPC stubs, exactly as a client would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.config import Settings
from service.proto import cnnserve_pb2_grpc as pb_grpc
from service.server import Server


class RunningServer:
    """A started `Server` and the loop thread it runs on."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(settings)
        self.call(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def call(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 5.0) -> None:
        self.channel.close()
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_server(repository: Path, **overrides) -> RunningServer:
    settings = dataclasses.replace(
        Settings(),
        model_repository=repository,
        grpc_address="127.0.0.1",
        grpc_port=0,
        metrics_address="127.0.0.1",
        metrics_port=-1,  # a free port
        **overrides,
    )
    return RunningServer(settings)


@pytest.fixture(scope="session")
def server(tiny_repository: Path) -> Iterator[RunningServer]:
    running = start_server(tiny_repository)
    yield running
    running.stop()
