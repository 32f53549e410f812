"""The drain gate: calls counted while they run, refused with UNAVAILABLE once draining, and
each method's handler wrapped once at registration (no per-call interceptor)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from service.draining import SHUTTING_DOWN, DrainGate


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborted = (code, message)
        raise Aborted


class Server:
    """Records what a service registers, as grpc.aio.Server would take it."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic += list(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered[service] = handlers


class Details:
    def __init__(self, method: str) -> None:
        self.method = method


def test_a_gated_call_is_counted_and_refused_once_draining() -> None:
    gate = DrainGate()
    seen = []

    async def echo(request: str, context: Any) -> str:
        seen.append(gate.inflight)
        return request.upper()

    handler = gate.gated(grpc.unary_unary_rpc_method_handler(echo))
    context = Context()
    assert asyncio.run(handler.unary_unary("hi", context)) == "HI"
    assert seen == [1] and gate.inflight == 0
    gate.start()
    with pytest.raises(Aborted):
        asyncio.run(handler.unary_unary("hi", context))
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
    assert seen == [1] and gate.inflight == 0  # refused before it ran


def test_registration_wraps_each_handler_once() -> None:
    gate, server = DrainGate(), Server()

    async def ok(request: Any, context: Any) -> str:
        return "ok"

    handlers = {"Ping": grpc.unary_unary_rpc_method_handler(ok)}
    registrar = gate.registrar(server)  # type: ignore[arg-type]
    registrar.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("svc", handlers)])
    registrar.add_registered_method_handlers("svc", handlers)
    assert server.registered["svc"]["Ping"] is not handlers["Ping"]
    generic = server.generic[0]
    first = generic.service(Details("/svc/Ping"))  # type: ignore[arg-type]
    assert first is generic.service(Details("/svc/Ping"))  # type: ignore[arg-type]
    assert generic.service(Details("/svc/Nope")) is None  # type: ignore[arg-type]
    assert list(generic.cache) == ["/svc/Ping"]  # type: ignore[attr-defined]
    gate.start()
    context = Context()
    with pytest.raises(Aborted):
        asyncio.run(first.unary_unary(None, context))
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
