"""Graceful shutdown that loses nothing: refuse new calls cleanly, finish the accepted ones.

Stopping the gRPC server outright kills calls that have arrived but are still waiting for a
handler, and their clients see CANCELLED: ambiguous (was it run?) and not retried by standard
retry policies. So shutdown drains first: from SIGTERM on, every new call is refused at once
with UNAVAILABLE and a message saying to go elsewhere (safe to retry: it never ran), the calls
already running finish, and only when none is left does the server stop. Health checks still
answer (NOT_SERVING), so load balancers see the change.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

QUIET_SECONDS = 0.2  # no new call for this long before the port closes
POLL_SECONDS = 0.02
SHUTTING_DOWN = "server is shutting down: the call was not run; retry on another replica"

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def _same_kind(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and (de)serializers running `behavior`."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior_of(handler: grpc.RpcMethodHandler) -> Behavior:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


class DrainGate:
    """Counts calls in progress; once draining, refuses new ones (health checks excepted).

    Not an interceptor: grpc.aio awaits every interceptor on every call, so the gate wraps
    each method's handler once, when it is registered (`registrar`), and checks a flag per
    call (with two smaller changes, server CPU per call x0.84 for lenet5 at concurrency 32:
    bench/results/changes/2026-11-27-drain-gate-and-cached-names.json).
    """

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self.last_arrival = time.monotonic()

    def registrar(self, server: grpc.aio.Server) -> Registrar:
        """What to pass to `add_*Servicer_to_server` in place of `server` to gate a service."""
        return Registrar(server, self)

    def start(self) -> None:
        """From now on, new calls are refused with UNAVAILABLE."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call runs and none arrived for QUIET_SECONDS; False on `timeout`.

        The quiet period matters: a client that just got an answer sends its next call at
        once. That call must reach the server and get its refusal before the server closes,
        or gRPC cancels it unseen and the client gets CANCELLED instead of a clean UNAVAILABLE.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inflight == 0 and time.monotonic() - self.last_arrival >= QUIET_SECONDS:
                return True
            await asyncio.sleep(POLL_SECONDS)
        return False

    def gated(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler`, counted while it runs and refused with UNAVAILABLE once draining."""
        behavior = _behavior_of(handler)
        if handler.response_streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                self.last_arrival = time.monotonic()
                if self.draining:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                self.inflight += 1
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    elif inspect.isawaitable(result):  # a handler that writes with context.write
                        await result
                    else:
                        for item in result:
                            yield item
                finally:
                    self.inflight -= 1

            return _same_kind(handler, stream)

        is_async = inspect.iscoroutinefunction(behavior)  # every servicer of ours: known once

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.last_arrival = time.monotonic()
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            self.inflight += 1
            try:
                if is_async:
                    return await behavior(request, context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self.inflight -= 1

        return _same_kind(handler, unary)


class _GatedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose every method handler is gated, each wrapped once."""

    def __init__(self, inner: grpc.GenericRpcHandler, gate: DrainGate) -> None:
        self.inner = inner
        self.gate = gate
        self.cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method  # type: ignore[attr-defined]
        gated = self.cache.get(method)
        if gated is None:
            handler = self.inner.service(handler_call_details)
            if handler is None:
                return None  # not ours: unknown names are not remembered, or they would pile up
            gated = self.cache[method] = self.gate.gated(handler)
        return gated


class Registrar:
    """Stands in for the server when a service registers: its handlers come back gated."""

    def __init__(self, server: grpc.aio.Server, gate: DrainGate) -> None:
        self.server = server
        self.gate = gate

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers([_GatedGeneric(h, self.gate) for h in handlers])

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        gated = {name: self.gate.gated(h) for name, h in method_handlers.items()}
        self.server.add_registered_method_handlers(service_name, gated)
