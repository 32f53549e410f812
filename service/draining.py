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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.security import HEALTH_METHODS, rejecting_handler

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


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls in progress; once draining, refuses new ones (health checks excepted)."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self.last_arrival = time.monotonic()

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

    def _enter(self) -> None:
        self.inflight += 1

    def _exit(self) -> None:
        self.inflight -= 1

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = _behavior_of(handler)
        if handler.response_streaming:

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                self._enter()
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
                    self._exit()

            return _same_kind(handler, stream)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self._exit()

        return _same_kind(handler, unary)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method in HEALTH_METHODS:
            return handler
        self.last_arrival = time.monotonic()
        if self.draining:
            return rejecting_handler(handler, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        return self._counted(handler)
